"""SAEBench-style sparse probing: one-vs-rest topic tasks on mean-pooled latents and, as the
baseline, on the raw activations at the same site. Owns the logistic probe, the top-k selection by
class-mean difference, the pooling of texts and the probing result.

Knows nothing of tables or files (report.py) or of the core metrics beyond the SAE naming of
core.py; nothing of the server or of training. Latents come from `sae.encode_inputs` (special and
massive-activation tokens left out), batches from `sites.capture_batches`.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from tqdm import tqdm

from gemmascope.corpus import DEFAULT_CORPUS, load_corpus, special_mask
from gemmascope.errors import ConfigError, CorpusError
from gemmascope.evals.core import SAEs, _named
from gemmascope.models import LanguageModel
from gemmascope.sae import SAE, encode_inputs, massive_mask, sae_site
from gemmascope.sites import Site, capture_batches

PROBE_KS = (1, 2, 5)
# Topic labels that say "no topic"; articles carrying them are left out of probing.
_NO_TOPIC = {"", "uncategorized", "none"}


@dataclass
class LogisticProbe:
    """Multinomial logistic regression on standardised features, fitted with L-BFGS and an L2
    penalty `l2 / (2 n) * ||W||^2` (the scale of scikit-learn's `C = 1 / l2`)."""

    weight: Tensor  # [d, classes]
    bias: Tensor  # [classes]
    mean: Tensor  # [d]
    std: Tensor  # [d]

    @classmethod
    def fit(
        cls, x: Tensor, y: Tensor, n_classes: int | None = None, l2: float = 1.0, max_iter: int = 200
    ) -> LogisticProbe:
        """Fit on `x [n, d]` with labels `y [n]` in 0..n_classes-1."""
        x = x.double()
        n_classes = n_classes or int(y.max()) + 1
        mean, std = x.mean(0), x.std(0, unbiased=False).clamp_min(1e-8)
        z = (x - mean) / std
        weight = torch.zeros(x.shape[1], n_classes, dtype=torch.float64, requires_grad=True)
        bias = torch.zeros(n_classes, dtype=torch.float64, requires_grad=True)
        opt = torch.optim.LBFGS([weight, bias], max_iter=max_iter, line_search_fn="strong_wolfe")

        def closure() -> Tensor:
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(z @ weight + bias, y)
            loss = loss + l2 / (2 * x.shape[0]) * weight.pow(2).sum()
            loss.backward()  # type: ignore[no-untyped-call]
            return loss

        # Tiny tensors: thread hand-offs cost more than the arithmetic (20x here on a busy CPU).
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            with torch.enable_grad():
                opt.step(closure)  # type: ignore[no-untyped-call]
        finally:
            torch.set_num_threads(threads)
        return cls(weight.detach(), bias.detach(), mean, std)

    def predict(self, x: Tensor) -> Tensor:
        """`[n, d] -> [n]` predicted class."""
        z = (x.double() - self.mean) / self.std
        return (z @ self.weight + self.bias).argmax(-1)

    def accuracy(self, x: Tensor, y: Tensor) -> float:
        return float((self.predict(x) == y).double().mean())


def top_k_by_mean_difference(x: Tensor, y: Tensor, k: int) -> Tensor:
    """Indices `[k]` of the features of `x [n, d]` whose class means (binary labels `y [n]`) differ
    most in absolute value."""
    diff = x[y == 1].mean(0) - x[y == 0].mean(0)
    return diff.abs().topk(min(k, x.shape[1])).indices


def probe_accuracies(
    x_train: Tensor, y_train: Tensor, x_test: Tensor, y_test: Tensor, ks: Sequence[int], prefix: str
) -> dict[str, float]:
    """Test accuracy of a probe on all features (`{prefix}_test_accuracy`) and on the top-k by class-
    mean difference on the training set (`{prefix}_top_{k}_test_accuracy`)."""
    out = {f"{prefix}_test_accuracy": LogisticProbe.fit(x_train, y_train, 2).accuracy(x_test, y_test)}
    for k in ks:
        idx = top_k_by_mean_difference(x_train, y_train, k)
        probe = LogisticProbe.fit(x_train[:, idx], y_train, 2)
        out[f"{prefix}_top_{k}_test_accuracy"] = probe.accuracy(x_test[:, idx], y_test)
    return out


def _tokenize_articles(model: LanguageModel, texts: Sequence[str], context_len: int) -> list[list[int]]:
    bos = model.tokenizer.bos_token_id
    encoded = model.tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    return [[bos, *ids[: context_len - 1]] for ids in encoded]


def _padded(model: LanguageModel, tokens: Sequence[Sequence[int]]) -> tuple[Tensor, Tensor]:
    """Token lists as `[n, width]` ids right-padded with the pad id (0 without one), and their
    attention mask `[n, width]`."""
    pad = model.tokenizer.pad_token_id
    pad = 0 if pad is None else pad
    width = max(len(t) for t in tokens)
    ids = torch.full((len(tokens), width), pad, dtype=torch.long)
    attention = torch.zeros(len(tokens), width, dtype=torch.long)
    for i, t in enumerate(tokens):
        ids[i, : len(t)] = torch.tensor(t)
        attention[i, : len(t)] = 1
    return ids, attention


def pooled_activations(
    model: LanguageModel,
    saes: Mapping[str, SAE],
    texts: Sequence[str],
    context_len: int = 128,
    batch_size: int = 8,
) -> tuple[dict[Site, Tensor], dict[str, Tensor]]:
    """Mean over each text's non-special tokens (first `context_len` tokens, BOS first) of the
    activation at every SAE's site, `{site: [n_texts, d_in]}`, and of every SAE's latents,
    `{sae_id: [n_texts, d_sae]}` (its massive-activation tokens left out too, as evaluation leaves
    them out). One forward pass per batch serves all SAEs; it stops after the deepest site."""
    sites = {sae_id: sae_site(model, sae) for sae_id, sae in saes.items()}
    unique_sites = sorted(set(sites.values()))
    ids, attention = _padded(model, _tokenize_articles(model, texts, context_len))
    raw: dict[Site, list[Tensor]] = {site: [] for site in unique_sites}
    latents: dict[str, list[Tensor]] = {sae_id: [] for sae_id in saes}
    batches = capture_batches(
        model, ids, unique_sites, batch_size, attention_mask=attention, desc="probing: pooling", progress=True
    )
    for batch in batches:
        assert batch.attention_mask is not None
        keep = batch.attention_mask.bool() & ~special_mask(batch.ids, model.special_token_ids)  # [B, T]
        count = keep.sum(1, keepdim=True).clamp_min(1)  # [B, 1]
        for site in unique_sites:
            raw[site].append(((batch.acts[site].float() * keep[..., None]).sum(1) / count).cpu())
        for sae_id, sae in saes.items():
            x = batch.acts[sites[sae_id]]
            left_in = keep & ~massive_mask(sae, x)  # [B, T]
            f = encode_inputs(sae, x, keep).float()  # [B, T, d_sae], zero where not left in
            latents[sae_id].append((f.sum(1) / left_in.sum(1, keepdim=True).clamp_min(1)).cpu())
    return (
        {site: torch.cat(v) for site, v in raw.items()},
        {sae_id: torch.cat(v) for sae_id, v in latents.items()},
    )


def _probe_articles(
    corpus: str, split: str, n_per_class: int, min_per_class: int, seed: int
) -> tuple[list[str], list[str], list[str]]:
    """Up to `n_per_class` article texts of each topic with at least `min_per_class` articles."""
    docs = load_corpus(corpus, split=split)
    by_topic: dict[str, list[str]] = {}
    for doc in docs:
        topic = (doc.topic or "").strip()
        if topic.lower() not in _NO_TOPIC and doc.text.strip():
            by_topic.setdefault(topic, []).append(doc.text)
    rng = random.Random(seed)
    classes = sorted(t for t, texts in by_topic.items() if len(texts) >= min_per_class)
    if len(classes) < 2:
        counts = {t: len(v) for t, v in sorted(by_topic.items())}
        raise CorpusError(
            f"sparse probing needs at least 2 topics with >= {min_per_class} articles in the "
            f"{split!r} split of corpus {corpus!r}; found {counts}"
        )
    texts, labels = [], []
    for topic in classes:
        chosen = rng.sample(by_topic[topic], min(n_per_class, len(by_topic[topic])))
        texts += chosen
        labels += [topic] * len(chosen)
    return texts, labels, classes


def sparse_probing(
    model: LanguageModel,
    saes: SAEs,
    corpus: str = DEFAULT_CORPUS,
    split: str = "heldout",
    n_per_class: int = 50,
    ks: Sequence[int] = PROBE_KS,
    context_len: int = 128,
    test_fraction: float = 0.3,
    min_per_class: int = 10,
    batch_size: int = 8,
    seed: int = 0,
) -> dict[str, Any]:
    """SAEBench-style sparse probing on the corpus's topic labels. Up to `n_per_class` articles of
    each topic are mean-pooled (latents and raw activations); for each topic a class-balanced
    one-vs-rest task (its articles against as many drawn from the other topics) is split into
    train and test; the top-k latents by class-mean difference on train feed a logistic
    regression for each k, and a probe on the raw activations at the same site is the baseline.

    Returns `{"eval_type_id": "sparse_probing", "eval_config", "classes", "llm": {site: {...}},
    "saes": {sae_id: {"llm": {...}, "sae": {...}}}}` with accuracies averaged over topics under
    SAEBench's names (`llm_test_accuracy`, `llm_top_{k}_test_accuracy`, `sae_test_accuracy`,
    `sae_top_{k}_test_accuracy`)."""
    named = _named(saes)
    if not 0 < test_fraction < 1:
        raise ConfigError(f"test_fraction must be between 0 and 1, got {test_fraction}")
    texts, labels, classes = _probe_articles(corpus, split, n_per_class, min_per_class, seed)
    raw, latents = pooled_activations(model, named, texts, context_len, batch_size)
    sites = {sae_id: sae_site(model, sae) for sae_id, sae in named.items()}

    gen = torch.Generator().manual_seed(seed)
    label_idx = torch.tensor([classes.index(t) for t in labels])
    tasks = []  # (class, train indices, train labels, test indices, test labels)
    for c, topic in enumerate(classes):
        pos = torch.nonzero(label_idx == c).flatten()
        neg = torch.nonzero(label_idx != c).flatten()
        n = min(len(pos), len(neg))  # balanced: as many negatives as positives
        pos = pos[torch.randperm(len(pos), generator=gen)[:n]]
        neg = neg[torch.randperm(len(neg), generator=gen)[:n]]
        n_test = min(n - 1, max(1, round(test_fraction * n)))
        train = torch.cat([pos[n_test:], neg[n_test:]])
        test = torch.cat([pos[:n_test], neg[:n_test]])
        y_train = torch.cat([torch.ones(n - n_test), torch.zeros(n - n_test)]).long()
        y_test = torch.cat([torch.ones(n_test), torch.zeros(n_test)]).long()
        tasks.append((topic, train, y_train, test, y_test))

    def run(features: Tensor, prefix: str) -> dict[str, Any]:
        per_class = {
            topic: probe_accuracies(features[tr], ytr, features[te], yte, ks, prefix)
            for topic, tr, ytr, te, yte in tasks
        }
        keys = next(iter(per_class.values())).keys()
        mean = {k: sum(pc[k] for pc in per_class.values()) / len(per_class) for k in keys}
        return {**mean, "per_class": per_class}

    llm = {str(site): run(x, "llm") for site, x in tqdm(raw.items(), desc="probing: raw activations")}
    per_sae = {
        sae_id: {"llm": llm[str(sites[sae_id])], "sae": run(latents[sae_id], "sae")}
        for sae_id in tqdm(named, desc="probing: SAEs")
    }
    return {
        "eval_type_id": "sparse_probing",
        "eval_config": {
            "model_name": model.name,
            "dataset": corpus,
            "split": split,
            "n_per_class": n_per_class,
            "k_values": list(ks),
            "context_length": context_len,
            "test_fraction": test_fraction,
            "seed": seed,
            "n_articles": len(texts),
            "n_test_per_task": {topic: len(te) for topic, _, _, te, _ in tasks},
        },
        "classes": classes,
        "llm": llm,
        "saes": per_sae,
    }


def attach_probing(results: Sequence[dict[str, Any]], probing: Mapping[str, Any]) -> None:
    """Put each SAE's probing accuracies (without the per-class detail) into its core result
    under `sparse_probing`, so `eval.json` and the table carry them."""
    for r in results:
        entry = probing["saes"].get(r["sae_id"])
        if entry:
            r["sparse_probing"] = {
                group: {k: v for k, v in entry[group].items() if k != "per_class"} for group in ("llm", "sae")
            }
