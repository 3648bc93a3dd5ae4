"""The local replacement model of one prompt (circuit-tracer's, Ameisen et al. 2025): the model with
every layer's MLP replaced by its transcoder or by a cross-layer transcoder (`dictionary.Dictionary`),
an error term for what it misses, and
attention patterns and every RMSNorm's denominator frozen at their values on the prompt. With those
frozen, the residual stream is a linear function of what is written into it (token embeddings,
feature decoder vectors times activations, error terms, biases), so the effect of any of those on
any later read (a feature's encoder, a logit) is one backward pass.

A transcoder leaves out the positions where its input is massive (`sae.massive_mask`, Gemma 3's
massive activations, as everywhere else: evals, the index): there it has no active feature, adds no
skip connection, and the MLP's output is left exact, carried wholly by its error node
(`massive_positions`).

Owns capturing what is frozen (`capture_prompt`, one ordinary forward pass), the massive rule and the
linear backward (`ReplacementModel.backward`), written for Gemma 3 layers (pre/post norms around attention and MLP,
grouped-query attention, scaled embeddings) from the model's own weights. Knows nothing of graphs,
pruning or files (`graph.py`, `files.py`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from gemmascope.attribution.dictionary import Dictionary
from gemmascope.errors import ConfigError, ModelError
from gemmascope.models import LanguageModel


@dataclass
class Prompt:
    """One prompt's pass through the real model, with what the replacement model freezes. `n` is the
    number of positions (BOS included), `d` d_model, `L` the number of layers."""

    ids: Tensor  # [n] token ids, BOS first
    embeds: Tensor  # [n, d] the scaled token embeddings entering layer 0
    scales: dict[str, list[Tensor]]  # norm name -> per layer [n, 1] frozen 1/RMS ("final": one entry)
    patterns: list[Tensor]  # per layer [heads, n, n] attention probabilities
    mlp_in: list[Tensor]  # per layer [n, d]: the transcoders' input (after pre_feedforward_layernorm)
    mlp_out: list[Tensor]  # per layer [n, d]: what the MLP adds to the residual stream
    logits: Tensor  # [vocab] at the last position


_NORMS = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm")


def _cpu(weight: Tensor) -> Tensor:
    """A weight as the linear backward uses it: detached float32 on the CPU (the model may be on a GPU)."""
    return weight.detach().float().cpu()


def _linear(module: Any) -> tuple[Tensor, Tensor | None]:
    """A linear layer's weight and bias, as `_cpu` gives them."""
    return _cpu(module.weight), None if module.bias is None else _cpu(module.bias)


def _rms_scale(norm: nn.Module, x: Tensor) -> Tensor:
    """`[..., 1]`: the 1 / RMS factor an RMSNorm applies to `x` (frozen in the replacement model)."""
    eps = float(getattr(norm, "eps", getattr(norm, "variance_epsilon", 1e-6)))
    return torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)


def capture_prompt(model: LanguageModel, ids: Tensor) -> Prompt:
    """Run `ids [n]` (BOS first) through the model once, in eager attention, recording the scaled
    embeddings, every norm's 1/RMS, every attention pattern, every MLP's input and output and the
    last position's logits."""
    hf: Any = model.hf
    check_gemma3(model)
    layers = model.layers
    record: dict[str, Any] = {
        "scales": {k: [None] * len(layers) for k in _NORMS},
        "patterns": [None] * len(layers),
    }
    record["mlp_in"], record["mlp_out"] = [None] * len(layers), [None] * len(layers)
    handles = []

    def keep(key: str, index: int, value: Tensor) -> None:
        record[key][index] = value[0].detach().float()

    handles.append(
        hf.model.embed_tokens.register_forward_hook(lambda _m, _a, out: record.update(embeds=out[0].float()))
    )
    for i, block in enumerate(layers):
        layer: Any = block
        for name in _NORMS:
            norm = getattr(layer, name)
            handles.append(
                norm.register_forward_pre_hook(
                    lambda m, args, name=name, i=i: record["scales"][name].__setitem__(
                        i, _rms_scale(m, args[0])[0]
                    )
                )
            )
        handles.append(
            layer.pre_feedforward_layernorm.register_forward_hook(
                lambda _m, _a, out, i=i: keep("mlp_in", i, out)
            )
        )
        handles.append(
            layer.post_feedforward_layernorm.register_forward_hook(
                lambda _m, _a, out, i=i: keep("mlp_out", i, out)
            )
        )
        handles.append(
            layer.self_attn.register_forward_hook(lambda _m, _a, out, i=i: keep("patterns", i, out[1]))
        )
    final_norm = hf.model.norm
    handles.append(
        final_norm.register_forward_pre_hook(lambda m, args: record.update(final=_rms_scale(m, args[0])[0]))
    )
    before = hf.config._attn_implementation
    try:
        hf.set_attn_implementation("eager")  # the attention probabilities come back only in eager attention
        with torch.no_grad():
            logits = hf(input_ids=ids[None].to(model.device), use_cache=False).logits[0, -1].float()
    finally:
        for handle in handles:
            handle.remove()
        hf.set_attn_implementation(before)
    if any(p is None for p in record["patterns"]):
        raise ConfigError(f"model {model.name!r} returned no attention probabilities; attribution needs them")
    scales = {**record["scales"], "final": [record["final"]]}
    return Prompt(
        ids=ids.cpu(),
        embeds=record["embeds"].detach().cpu(),
        scales={k: [s.cpu() for s in v] for k, v in scales.items()},
        patterns=[p.cpu() for p in record["patterns"]],
        mlp_in=[x.cpu() for x in record["mlp_in"]],
        mlp_out=[x.cpu() for x in record["mlp_out"]],
        logits=logits.cpu(),
    )


def massive_positions(dictionary: Dictionary, prompt: Prompt) -> list[Tensor]:
    """Per layer, `[n]` bool: the positions where that layer's transcoder's input (the MLP input on
    the prompt) is massive (`sae.massive_mask`). There the transcoder stands aside: no feature is
    active, no skip connection is written, and the MLP's output is all error."""
    return [dictionary.massive(layer, x) for layer, x in enumerate(prompt.mlp_in)]


_NEEDED = ("self_attn", *_NORMS, "post_feedforward_layernorm")


def check_gemma3(model: LanguageModel) -> None:
    """A ModelError unless the model is laid out as Gemma 3 text models are (the replacement model is
    written for their layers: norms around attention and MLP, scaled embeddings, a final norm)."""
    hf: Any = model.hf
    inner = getattr(hf, "model", None)
    missing = [name for name in ("embed_tokens", "norm") if not hasattr(inner, name)]
    missing += [
        f"layers[i].{name}" for name in _NEEDED if not all(hasattr(layer, name) for layer in model.layers)
    ]
    if missing or not hasattr(hf, "set_attn_implementation"):
        raise ModelError(
            f"attribution graphs are written for Gemma 3 text models (Gemma3ForCausalLM); model {model.name!r} "
            f"({type(hf).__name__}) lacks {', '.join(missing) or 'set_attn_implementation'}"
        )


class ReplacementModel:
    """The frozen, linear replacement model of one prompt over a dictionary (a transcoder per layer
    or a CLT, `dictionary_of`, which checks it against the model). `backward`
    gives, for a batch of reads (a vector dotted with the residual stream at one layer's MLP input
    or after the final norm, at one position), their gradients at every write point: the token
    embeddings and each layer's MLP output. Everything runs in float32 on the CPU."""

    def __init__(self, model: LanguageModel, dictionary: Dictionary, prompt: Prompt) -> None:
        self.model, self.dictionary, self.prompt = model, dictionary, prompt
        cfg = model.config
        self.heads, self.kv_heads = int(cfg.num_attention_heads), int(cfg.num_key_value_heads)
        self.head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
        self.gains = {
            name: [1.0 + _cpu(getattr(layer, name).weight) for layer in model.layers] for name in _NORMS
        }
        self.final_gain = 1.0 + _cpu(model.hf.model.norm.weight)
        blocks: list[Any] = list(model.layers)
        self.v_proj = [_linear(block.self_attn.v_proj) for block in blocks]
        self.o_proj = [_linear(block.self_attn.o_proj) for block in blocks]
        self.skips = dictionary.skips
        self.massive = massive_positions(dictionary, prompt)
        # [n, 1] 1.0 where the skip connection is written, 0.0 at massive inputs (None: written everywhere)
        self.skip_where = [m.logical_not().float()[:, None] if m.any() else None for m in self.massive]

    def _attention(self, layer: int, x: Tensor) -> Tensor:
        """`[B, m, d] -> [B, m, d]`: layer `layer`'s attention over the first m positions with its
        pattern and norms frozen (causal: the first m positions attend to nothing after them)."""
        p = self.prompt
        batch, n = x.shape[:2]
        a = x * p.scales["input_layernorm"][layer][:n] * self.gains["input_layernorm"][layer]
        v = nn.functional.linear(a, *self.v_proj[layer])
        v = v.view(batch, n, self.kv_heads, self.head_dim).repeat_interleave(
            self.heads // self.kv_heads, dim=2
        )
        pattern = p.patterns[layer][:, :n, :n]
        z = torch.einsum("hqk,bkhd->bqhd", pattern, v).reshape(batch, n, self.heads * self.head_dim)
        out = nn.functional.linear(z, *self.o_proj[layer])
        return (
            out
            * p.scales["post_attention_layernorm"][layer][:n]
            * self.gains["post_attention_layernorm"][layer]
        )

    def backward(self, layers: Tensor, positions: Tensor, vectors: Tensor) -> tuple[Tensor, list[Tensor]]:
        """Gradients of `Σ_b vectors[b] · r_b` at every write point, for a batch of B reads: read b
        is at `positions[b]` of the MLP input of layer `layers[b]` (a feature's encoder), or after the
        final norm when `layers[b]` is the number of layers (a logit). Returns `(g_embed [B, n, d],
        [g_out_L [B, n, d] for each layer])`: row b holds read b's gradient alone (rows never mix).
        Only the layers up to the batch's highest read (that layer's attention included) and the
        positions up to its last one are run (nothing later reaches them: the model is causal), so a
        batch of reads alike in layer and position costs less; the rest of the gradients are zero."""
        p = self.prompt
        n_layers = self.dictionary.n_layers
        batch, (n, d) = layers.shape[0], p.embeds.shape
        top, m = (
            int(layers.max()),
            int(positions.max()) + 1,
        )  # layers 0..top run (top = n_layers: all, a logit)
        embed = p.embeds[:m].expand(batch, m, d).clone().requires_grad_(True)
        writes = [torch.zeros(batch, m, d, requires_grad=True) for _ in range(min(top, n_layers))]
        rows = torch.arange(batch)
        total = torch.zeros(())
        x = embed
        for layer in range(min(top + 1, n_layers)):
            x = x + self._attention(layer, x)
            mlp_in = (
                x
                * p.scales["pre_feedforward_layernorm"][layer][:m]
                * self.gains["pre_feedforward_layernorm"][layer]
            )
            here = layers == layer
            if here.any():
                total = total + (mlp_in[rows[here], positions[here]] * vectors[here]).sum()
            if layer == top:  # no read is above this layer's MLP input
                break
            out: Tensor = writes[layer]
            skip = self.skips[layer]
            if skip is not None:  # the skip connection is part of the linear path, not a node
                linear = mlp_in @ skip
                where = self.skip_where[layer]
                out = out + (linear if where is None else linear * where[:m])  # none from a massive input
            x = x + out
        here = layers == n_layers
        if here.any():
            final = x * p.scales["final"][0][:m] * self.final_gain
            total = total + (final[rows[here], positions[here]] * vectors[here]).sum()
        grads = torch.autograd.grad(total, [embed, *writes], allow_unused=True)

        def full(g: Tensor | None) -> Tensor:
            if g is not None and m == n:
                return g
            out = torch.zeros(batch, n, d)
            if g is not None:
                out[:, :m] = g
            return out

        unreached = torch.zeros(batch, n, d)  # one zero tensor for the layers above the reads (read only)
        return full(grads[0]), [full(g) for g in grads[1:]] + [unreached] * (n_layers - len(writes))
