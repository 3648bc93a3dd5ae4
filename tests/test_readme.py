"""The README's Python tutorial runs as written, top to bottom, on the real Gemma 3 270M."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks(text: str) -> list[str]:
    """The fenced ```python blocks of a Markdown text, in order."""
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


def test_readme_has_two_setup_commands_and_the_demo() -> None:
    text = README.read_text()
    setup = text.split("## Set up", 1)[1].split("##", 1)[0]
    commands = [
        line for line in re.findall(r"```bash\n(.*?)```", setup, flags=re.S)[0].splitlines() if line.strip()
    ]
    assert commands == ['pip install torch==2.13.0 -e ".[dev]"', "python -m pytest"]
    assert "gemmascope demo" in text


@pytest.mark.real
def test_readme_tutorial_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocks = python_blocks(README.read_text())
    assert len(blocks) >= 6
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TQDM_DISABLE", "1")
    namespace: dict[str, object] = {"__name__": "readme"}
    for i, block in enumerate(blocks):
        try:
            exec(compile(block, f"README.md python block {i + 1}", "exec"), namespace)
        except Exception as err:  # pragma: no cover - the message says which block failed
            raise AssertionError(f"README python block {i + 1} failed: {err!r}\n{block}") from err
