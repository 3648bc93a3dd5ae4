"""Sites. Owns the names of the places in a model SAEs read (`resid_post`, `attn_out`, `mlp_out`,
`mlp_in` at a layer; TransformerLens aliases such as `blocks.6.hook_resid_post`), their widths and hook
points, the one capture mechanism (many sites in one forward pass, stopping after the deepest layer
needed, or with the trunk: every layer's output and the final hidden states; `capture_batches` runs
it over token rows a batch at a time for every batch loop of the project), the one edit mechanism
(the context manager that replaces a site's activation in every forward pass), and `resume`: an
edited pass that replays the clean pass's outputs for the layers no edit touches.

Takes a loaded `models.LanguageModel`; knows nothing of loading models, nor of SAEs, their training
or their files.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, overload

import torch
from torch import Tensor, nn

from gemmascope.errors import ConfigError, ModelError

if TYPE_CHECKING:  # types only: models re-exports this module's names, so a runtime import would cycle
    from gemmascope.models import LanguageModel

SITE_KINDS = ("resid_post", "attn_out", "mlp_out", "mlp_in")

# TransformerLens hook names users already know, per site kind.
_TL_SUFFIX = {
    "resid_post": "hook_resid_post",
    "attn_out": "attn.hook_z",
    "mlp_out": "hook_mlp_out",
    "mlp_in": "hook_mlp_in",
}

# Gemma Scope 2's `hf_hook_point_in/out` in a release's config.json: the transformers module path of
# each site kind (the same points this module hooks).
_HF_SUFFIX = {
    "resid_post": "output",
    "attn_out": "self_attn.o_proj.input",
    "mlp_out": "post_feedforward_layernorm.output",
    "mlp_in": "pre_feedforward_layernorm.output",
}
_HF_HOOK = re.compile(r"^model\.(?:language_model\.)?layers\.(\d+)\.(.+)$")


# ---------------------------------------------------------------------------------------------
# Sites


@dataclass(frozen=True, order=True)
class Site:
    """A place in the model an SAE reads: a kind (`resid_post`, `attn_out`, `mlp_out`, `mlp_in`)
    at a layer. `str(site)` is `kind.layer`; `hook_name` is the TransformerLens name."""

    kind: str
    layer: int

    def __str__(self) -> str:
        return f"{self.kind}.{self.layer}"

    @property
    def hook_name(self) -> str:
        return f"blocks.{self.layer}.{_TL_SUFFIX[self.kind]}"

    @property
    def hf_hook_point(self) -> str:
        """Gemma Scope 2's name of this point (config.json's `hf_hook_point_in/out`)."""
        return f"model.layers.{self.layer}.{_HF_SUFFIX[self.kind]}"

    @property
    def folder(self) -> str:
        """Relative folder of this site in a run: `SITE/layer_L`."""
        return f"{self.kind}/layer_{self.layer}"


_SITE_PATTERNS = [
    re.compile(r"^(?P<kind>[a-z_]+)[./@](?:layer_)?(?P<layer>\d+)$"),
    re.compile(r"^blocks\.(?P<layer>\d+)\.(?P<tl>hook_resid_post|attn\.hook_z|hook_mlp_out|hook_mlp_in)$"),
]
_TL_TO_KIND = {suffix: kind for kind, suffix in _TL_SUFFIX.items()}


def parse_site(spec: str | Site, n_layers: int | None = None) -> Site:
    """Parse `resid_post.6`, `resid_post/layer_6`, `blocks.6.hook_resid_post`, `blocks.6.attn.hook_z`
    or `blocks.6.hook_mlp_out` into a Site, checking the layer against `n_layers` when given."""
    site: Site | None = spec if isinstance(spec, Site) else None
    if site is None:
        assert isinstance(spec, str)
        for pattern in _SITE_PATTERNS:
            m = pattern.match(spec.strip())
            if m:
                kind = m.groupdict().get("kind") or _TL_TO_KIND[m.group("tl")]
                site = Site(kind, int(m.group("layer")))
                break
        if site is None or site.kind not in SITE_KINDS:
            raise ConfigError(
                f"unknown site {spec!r}: expected KIND.LAYER with KIND one of {', '.join(SITE_KINDS)} "
                "(e.g. 'resid_post.6'), or a TransformerLens name such as 'blocks.6.hook_resid_post'"
            )
    assert site is not None
    if n_layers is not None and not 0 <= site.layer < n_layers:
        raise ConfigError(
            f"layer {site.layer} of site {spec!r} is out of range: valid layers are 0..{n_layers - 1}"
        )
    return site


def site_of_hf_hook(name: str) -> Site | None:
    """The site of a Gemma Scope 2 `hf_hook_point_in/out` (e.g. `model.layers.5.pre_feedforward_layernorm.output`
    -> `mlp_in.5`), or None for a point this project does not read."""
    m = _HF_HOOK.match(name)
    kind = next((k for k, suffix in _HF_SUFFIX.items() if m and m.group(2) == suffix), None)
    return Site(kind, int(m.group(1))) if m and kind else None


def transcoder_sites(layer: int) -> tuple[Site, Site]:
    """The transcoder pair at a layer: MLP input (after pre_feedforward_layernorm) to `mlp_out`."""
    return Site("mlp_in", layer), Site("mlp_out", layer)


def site_d_in(model: LanguageModel, site: Site) -> int:
    """Width of the activation at a site: d_model, or heads × head_dim for `attn_out`."""
    if site.kind == "attn_out":
        cfg = model.config
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        return int(cfg.num_attention_heads * head_dim)
    return model.d_model


# ---------------------------------------------------------------------------------------------
# Hooks: one mechanism for capture and edits

SiteFn = Callable[[Tensor], Tensor | None]


def _hook(model: LanguageModel, site: Site, fn: SiteFn) -> torch.utils.hooks.RemovableHandle:
    """Register `fn(activation [batch, pos, d]) -> replacement or None` at the site's hook point."""
    layers = model.layers
    if not 0 <= site.layer < len(layers):
        raise ConfigError(f"layer {site.layer} is out of range: valid layers are 0..{len(layers) - 1}")
    block: Any = layers[site.layer]
    if site.kind == "attn_out":
        o_proj = block.self_attn.o_proj

        def pre_hook(_module: nn.Module, args: tuple[Any, ...]) -> Any:
            out = fn(args[0])
            return None if out is None else (out, *args[1:])

        return o_proj.register_forward_pre_hook(pre_hook)
    if site.kind == "resid_post":

        def resid_hook(_module: nn.Module, _args: Any, output: Any) -> Any:
            hidden = output[0] if isinstance(output, tuple) else output
            out = fn(hidden)
            if out is None:
                return None
            return (out, *output[1:]) if isinstance(output, tuple) else out

        return block.register_forward_hook(resid_hook)
    name = {"mlp_out": "post_feedforward_layernorm", "mlp_in": "pre_feedforward_layernorm"}[site.kind]
    module = getattr(block, name, None)
    if module is None:
        raise ModelError(f"site {site} needs {name!r}, which {type(block).__name__} does not have")
    return module.register_forward_hook(lambda _m, _a, output: fn(output))


class _StopForward(Exception):
    """Raised inside the forward pass once the deepest needed site has been captured."""


@dataclass
class Trunk:
    """A clean pass up to the model's output layer, what an edited pass over the same ids resumes
    from (`resume`): `outputs[i]` what decoder layer i returned (its residual stream `[B, T, d]`, in
    the layer's own output form, detached) and `final [B, T, d]` what the output layer reads (after
    the final norm; `models.output_head` turns it into logits)."""

    outputs: list[Any]
    final: Tensor


@overload
def capture(
    model: LanguageModel,
    input_ids: Tensor,
    sites: Sequence[Site],
    attention_mask: Tensor | None = None,
    trunk: Literal[False] = False,
) -> dict[Site, Tensor]: ...


@overload
def capture(
    model: LanguageModel,
    input_ids: Tensor,
    sites: Sequence[Site],
    attention_mask: Tensor | None = None,
    *,
    trunk: Literal[True],
) -> tuple[dict[Site, Tensor], Trunk]: ...


def capture(
    model: LanguageModel,
    input_ids: Tensor,
    sites: Sequence[Site],
    attention_mask: Tensor | None = None,
    trunk: bool = False,
) -> dict[Site, Tensor] | tuple[dict[Site, Tensor], Trunk]:
    """Run one forward pass over `input_ids [batch, pos]` and return each site's activation
    `[batch, pos, d_in]` (detached, in float32 whatever the model's dtype). Without `trunk` the
    pass stops after the deepest layer a site needs; with `trunk=True` it runs up to the output layer
    (whose product it leaves to the caller) and returns `(acts, Trunk)`: every layer's output and the
    final hidden states."""
    if not sites and not trunk:
        raise ConfigError("capture needs at least one site")
    acts: dict[Site, Tensor] = {}
    deepest = max((site.layer for site in sites), default=0)
    if deepest >= model.n_layers:
        raise ConfigError(f"layer {deepest} is out of range: valid layers are 0..{model.n_layers - 1}")

    def recorder(site: Site) -> SiteFn:
        def record(act: Tensor) -> None:
            acts[site] = act.detach().float()  # a bfloat16 model's too (models.reading_dtype)

        return record

    def stop(_module: nn.Module, _args: Any, _output: Any) -> None:
        raise _StopForward

    outputs: list[Any] = [None] * model.n_layers
    final: dict[str, Tensor] = {}
    with ExitStack() as stack:
        for site in sites:
            stack.callback(_hook(model, site, recorder(site)).remove)
        if trunk:
            for i, layer in enumerate(model.layers):
                stack.callback(layer.register_forward_hook(_output_keeper(outputs, i)).remove)
            stack.callback(_stop_at_head(model, final))
        else:
            stack.callback(model.layers[deepest].register_forward_hook(stop).remove)
        with torch.no_grad():
            try:
                model.hf(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
            except _StopForward:
                pass
    by_site = {site: acts[site] for site in sites}
    if trunk:
        return by_site, Trunk(outputs, final["h"])
    return by_site


def _output_keeper(outputs: list[Any], i: int) -> Callable[[nn.Module, Any, Any], None]:
    def keep(_module: nn.Module, _args: Any, output: Any) -> None:
        is_tuple = isinstance(output, tuple)
        outputs[i] = (output[0].detach(), *output[1:]) if is_tuple else output.detach()

    return keep


def _stop_at_head(model: LanguageModel, final: dict[str, Tensor]) -> Callable[[], None]:
    """Keep what the output layer reads in `final["h"]` and stop the pass there (its product, over
    the whole vocabulary, is the caller's to take in chunks); returns the hook's remover."""

    def stop(_module: nn.Module, args: tuple[Any, ...]) -> None:
        final["h"] = args[0]
        raise _StopForward

    return model.output_layer.register_forward_pre_hook(stop).remove


def resume(
    model: LanguageModel, input_ids: Tensor, trunk: Trunk, attention_mask: Tensor | None = None
) -> Tensor:
    """The final hidden states `[B, T, d]` (what the output layer reads) of a forward pass over
    `input_ids` with the edits in place (`edit_site`, `edit_from`: hooks), computed from the first
    layer an edit touches: every layer before it gives, without running, its output in `trunk`, the
    clean pass over the same ids (`capture(..., trunk=True)`), so the pass equals a whole one bit
    for bit. A layer whose own output alone is edited (a `resid_post` site) is replayed too, and its
    replayed output edited. Differentiable in what the edits add when gradients are on."""
    replayed = _replayable_layers(model)
    final: dict[str, Tensor] = {}
    with ExitStack() as stack:
        for i in range(replayed):
            output = trunk.outputs[i]
            if i == replayed - 1:  # the one the first real computation (or an edit) reads: a copy
                output = (output[0].clone(), *output[1:]) if isinstance(output, tuple) else output.clone()
            stack.enter_context(_replaying(model.layers[i], output))
        stack.callback(_stop_at_head(model, final))
        try:
            model.hf(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        except _StopForward:
            pass
    return final["h"]


# Hooks known to read without editing: transformers' output recorders (`output_hidden_states`,
# `output_attentions`), installed once and left on the model.
_READ_ONLY_HOOKS = ("transformers.utils.output_capturing",)


def _edits(hooks: Mapping[Any, Any]) -> bool:
    """Whether any of `hooks` may edit what it sees (any hook but a known reader)."""
    return any(getattr(hook, "__module__", None) not in _READ_ONLY_HOOKS for hook in hooks.values())


def _hooked(module: nn.Module) -> bool:
    return _edits(module._forward_hooks) or _edits(module._forward_pre_hooks)


def _replayable_layers(model: LanguageModel) -> int:
    """How many leading decoder layers an edited pass may replay from the clean pass: those before
    the first layer holding a hook (its own pre-hook or any hook of its modules), and that layer too
    when its only hooks are on its output. None when anything outside the layers is hooked."""
    from torch.nn.modules import module as torch_module

    layers = list(model.layers)
    inside = {id(m) for layer in layers for m in layer.modules()}
    if _edits(torch_module._global_forward_hooks) or _edits(torch_module._global_forward_pre_hooks):
        return 0
    if any(_hooked(m) for m in model.hf.modules() if id(m) not in inside):
        return 0
    for i, layer in enumerate(layers):
        if _edits(layer._forward_pre_hooks) or any(_hooked(m) for m in layer.modules() if m is not layer):
            return i
        if _edits(layer._forward_hooks):
            return i + 1
    return len(layers)


@contextmanager
def _replaying(layer: nn.Module, output: Any) -> Iterator[None]:
    """Within the block, `layer` returns `output` without computing (its hooks still run)."""
    had = "forward" in layer.__dict__  # an instance's own forward (accelerate's wrapper) is put back
    previous: Any = layer.__dict__.get("forward")
    layer.forward = lambda *_args, **_kwargs: output
    try:
        yield
    finally:
        if had:
            layer.forward = previous
        else:
            del layer.forward


@dataclass
class CapturedBatch:
    """One batch of `capture_batches`: rows `start:stop` of the token rows, their ids `[B, T]` and
    attention mask (or None) on the model's device, each site's activation `[B, T, d_in]`, and the
    clean pass's `Trunk` when asked for."""

    start: int
    stop: int
    ids: Tensor
    attention_mask: Tensor | None
    acts: dict[Site, Tensor]
    trunk: Trunk | None = None


def capture_batches(
    model: LanguageModel,
    rows: Tensor,
    sites: Sequence[Site],
    batch_rows: int,
    *,
    start: int = 0,
    stop: int | None = None,
    attention_mask: Tensor | None = None,
    trunk: bool = False,
    desc: str | None = None,
    progress: bool = False,
) -> Iterator[CapturedBatch]:
    """`capture` over token rows `rows [n_rows, T]` (rows `start:stop`), `batch_rows` rows per
    forward pass, in order: the one batch loop of harvesting, evaluation, probing and the feature
    index. With `attention_mask [n_rows, T]` (right padding), each batch is cut to its longest row.
    `desc` and `progress` show a progress bar of batches."""
    if batch_rows < 1:
        raise ConfigError(f"batch_rows={batch_rows} must be at least 1")
    stop = rows.shape[0] if stop is None else stop
    starts = range(start, stop, batch_rows)
    from tqdm import tqdm

    for a in tqdm(starts, desc=desc, unit="batch", disable=not progress):
        b = min(a + batch_rows, stop)
        ids, mask = rows[a:b], None
        if attention_mask is not None:
            mask = attention_mask[a:b]
            width = int(mask.sum(1).max())
            ids = ids[:, :width].contiguous().to(model.device)
            mask = mask[:, :width].contiguous().to(model.device)
        else:
            ids = ids.to(model.device)
        # no local keeps the batch's tensors while it is out, so a consumer can free them early
        if trunk:
            yield CapturedBatch(a, b, ids, mask, *capture(model, ids, sites, attention_mask=mask, trunk=True))
        else:
            yield CapturedBatch(a, b, ids, mask, capture(model, ids, sites, attention_mask=mask))


@contextmanager
def edit_site(model: LanguageModel, site: Site, fn: SiteFn) -> Iterator[None]:
    """Within the block, replace the activation at `site` by `fn(activation [batch, pos, d_in])`
    in every forward pass (and so in every generation step; a `fn` returning None reads it only). The hook is removed on exit, also when
    the body raises."""
    handle = _hook(model, site, fn)
    try:
        yield
    finally:
        handle.remove()


@contextmanager
def edit_from(
    model: LanguageModel, read: Site, write: Site, fn: Callable[[Tensor, Tensor], Tensor]
) -> Iterator[None]:
    """Within the block, replace the activation at `write` by `fn(read_act, write_act)`, `read_act`
    the activation at `read` earlier in the same forward pass (left as it is): what a transcoder
    does, reading its layer's MLP input and writing its MLP output."""
    held: dict[str, Tensor] = {}

    def hold(act: Tensor) -> None:
        held["x"] = act

    with edit_site(model, read, hold), edit_site(model, write, lambda act: fn(held["x"], act)):
        yield
