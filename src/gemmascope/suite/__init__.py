"""The main job: a Gemma Scope-like suite of SAEs in one run folder. `plan` owns what a suite is
asked (`SuitePlan`), every check of it before anything is written or run, and `run.json` (a re-run
with another plan is refused with the difference, or extends the recorded plan with `extend`);
`run` owns the order of the stages (harvest once, then per layer train and evaluate, then index,
the replacement model and report), `suite.json` (which stages are finished and for which sites and
SAEs, so a stage is never done by name alone), resuming a stopped suite without redoing finished
work, the time budget, and the suite report (table and layers x sites heatmap PNG). The demo that
runs it on one site lives in `demo.py`.

Calls only the public functions of the pipeline modules; knows nothing of their internals.
"""

from gemmascope.suite.plan import (
    L0_BANDS,
    SUITE_KINDS,
    TRANSCODER_KINDS,
    SuitePlan,
    parse_l0s,
    parse_layers,
    reconcile_plan,
)
from gemmascope.suite.run import BudgetReached, run_suite, write_suite_report

__all__ = [
    "L0_BANDS",
    "SUITE_KINDS",
    "TRANSCODER_KINDS",
    "BudgetReached",
    "SuitePlan",
    "parse_l0s",
    "parse_layers",
    "reconcile_plan",
    "run_suite",
    "write_suite_report",
]
