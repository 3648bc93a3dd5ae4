"""Explanations of latents. Owns the baseline explainer, which needs no other model (it describes a
latent by its top activating tokens, the token before them and its logit-lens tokens), and the
optional explainer that asks any OpenAI-compatible chat endpoint the user configures (URL + model
name), with detection scoring: the endpoint is shown held-out windows, some where the latent fires
and some where it does not, and must say which fit the explanation; the score is the balanced
accuracy of its answers.

Reads and writes explanations through `FeatureIndex`; knows nothing of how the index is built.
"""

from __future__ import annotations

import json
import random
import re
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from tqdm import tqdm

from gemmascope.errors import ConfigError, GemmaScopeError
from gemmascope.features.store import BASELINE, FeatureIndex

# ---------------------------------------------------------------------------------------------
# Baseline


BROAD_SHARE = 0.5  # a label's tokens cover at least this share of a latent's firings, else it says "many"
NAMED_SHARE = 0.1  # a token named as typical carries at least this share of the firings ...
NAMED_SEEN = 2  # ... and was seen in at least this many of the page's windows (one sample is chance)
LENS_COHERENT = 0.5  # the logit lens is named only when this share of its top tokens are readable words
LENS_AGREES = 0.15  # ... and its top tokens agree this much (`lens.lens_agreement`; a random direction's
# lens: 0.08 median, 0.16 at the 90th percentile): a readable lens of unrelated words is noise
PLAIN_WORD = 5  # letters of a plain (ASCII) word a lens may name though the index corpus lacks it
LENS_LEAD = 3  # a lens led by this many words of the index corpus (`led_lens`) ...
LENS_LEAD_AGREES = 0.3  # ... that agree this much names them, whatever follows them
CONTEXT_SHARE = 0.2  # a context word of a broad latent is in at least this share of its distinct windows ...
CONTEXT_LIFT = 5.0  # ... this many times as often as a window of the corpus holds it
CONTEXT_OVERLAP = 0.5  # a window sharing more than this share of its words with one kept is the same text


def _quote(token: str) -> str:
    return json.dumps(token.strip() or token, ensure_ascii=False)


def _focus(example: Mapping[str, Any]) -> str:
    token = example["tokens"][example["focus"]]
    return str(token.strip() or token)


def firing_shares(feature: Mapping[str, Any]) -> tuple[dict[str, float], Counter[str]]:
    """The estimated share of a latent's firings on each token (`{token: share}`, stripped as a label
    quotes it), from its interval samples: each of the 5 equal-width activation intervals holds a
    uniform sample of its windows, which stand for that interval's count of firings, so the weak
    firings that are most of a broad latent's count as much as they occur (the top examples show
    only the strongest). Also how many distinct windows of the page (intervals and top examples)
    each token is the focus of. Without interval samples, the windows count one each."""
    weight: dict[str, float] = {}
    for interval in feature.get("intervals") or []:
        for ex in interval["examples"]:
            token = _focus(ex)
            weight[token] = weight.get(token, 0.0) + interval["count"] / len(interval["examples"])
    windows = [ex for interval in feature.get("intervals") or [] for ex in interval["examples"]]
    windows += feature.get("top_examples") or []
    distinct = {(tuple(ex["tokens"]), ex["focus"]): ex for ex in windows}  # a top example may be sampled too
    seen = Counter(_focus(ex) for ex in distinct.values())
    if not weight:
        weight = {token: float(n) for token, n in seen.items()}
    total = sum(weight.values()) or 1.0
    return {token: w / total for token, w in weight.items()}, seen


class CorpusWords(dict[str, int]):
    """Each word's count in the index corpus (in `lens_word` form), and their sum `total`, taken once
    (`features.build.lens_vocabulary` makes it; every label of an SAE reads it)."""

    def __init__(self, counts: Mapping[str, int]) -> None:
        super().__init__(counts)
        self.total = sum(self.values())


def lens_word(token: str) -> str:
    """A logit-lens token as the word a reader checks it against: case and blanks folded, so
    " Birds" and "birds" are one word of the corpus."""
    return token.strip().lower()


def agreeing_lens(feature: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The page's promoted lens tokens (`[{token, value}]`), or none when its `agreement` (where the
    page has one) is under `LENS_AGREES`."""
    lens = feature.get("logit_lens") or {}
    return list(lens.get("promoted") or []) if float(lens.get("agreement", 1.0)) >= LENS_AGREES else []


def coherent_lens(feature: Mapping[str, Any], known_tokens: Collection[str] | None = None) -> list[str]:
    """The logit lens's promoted tokens a label may name: those a reader can check (their `lens_word`
    in `known_tokens`, the index corpus's words, when given, or a plain word of `PLAIN_WORD` letters
    or more; else any visible token), and only when they are at least `LENS_COHERENT` of the lens's
    top tokens. The lens of a broad latent is mostly junk (tokens of other scripts, byte pieces,
    blanks); a few common words surviving in it say nothing. A topic latent's lens is often words
    the small index corpus never holds (" coronavirus", " temperatures", " tournament"): plain
    words a reader knows all the same, named when the lens says one of them in two forms (its first
    `PLAIN_WORD` letters twice: " temperatures", " temperature"), as a random direction's does not.
    A lens whose top tokens do not agree (its `agreement` under `LENS_AGREES`, where the page has
    one: " energized", " BLINK", " Wolverine") is never named. Where that rule names nothing, a lens
    led by words of the corpus (`led_lens`) is named by them."""
    promoted = [p["token"] for p in agreeing_lens(feature)]

    def readable(token: str) -> bool:
        if known_tokens is not None:
            word = lens_word(token)
            return word in known_tokens or (len(word) >= PLAIN_WORD and word.isascii() and word.isalpha())
        return "\ufffd" not in token and any(ch.isprintable() and not ch.isspace() for ch in token)

    kept = [t for t in promoted if readable(t)]
    if not promoted or len(kept) < LENS_COHERENT * len(promoted):
        return led_lens(feature, known_tokens)
    if known_tokens is not None and any(lens_word(t) not in known_tokens for t in kept):
        # plain words the corpus lacks: only a lens that says one word twice (" tournament",
        # " Tournaments") is about something; a random direction's lens is plain words too
        stems = Counter(lens_word(t)[:PLAIN_WORD] for t in kept)
        if stems.most_common(1)[0][1] < 2:
            return led_lens(feature, known_tokens)
    return kept


def led_lens(feature: Mapping[str, Any], known_tokens: Collection[str] | None) -> list[str]:
    """The lens's tokens that are words of the index corpus (`known_tokens`), when its `LENS_LEAD`
    strongest tokens are all such words (letters or digits) and its tokens agree at least
    `LENS_LEAD_AGREES`, whatever follows them: a male latent's lens " his", " himself", " he" goes
    on with "他", "彼" and other scripts' words for the same, which `coherent_lens`'s share counts
    as junk; a lens of countries may hold one the corpus lacks. A page without `agreement` (an
    index built before it) never is. Else none."""
    lens = feature.get("logit_lens") or {}
    promoted = [p["token"] for p in lens.get("promoted") or []]
    if known_tokens is None or float(lens.get("agreement", 0.0)) < LENS_LEAD_AGREES:
        return []
    words = [t for t in promoted if lens_word(t) in known_tokens and lens_word(t).isalnum()]
    return words if len(promoted) >= LENS_LEAD and promoted[:LENS_LEAD] == words[:LENS_LEAD] else []


def context_words(feature: Mapping[str, Any], corpus_words: CorpusWords, n: int = 3) -> list[str]:
    """The words a broad latent's windows are about: words (`lens_word`, three letters or more) held
    by at least `CONTEXT_SHARE` of its distinct windows (top examples and interval samples; a window
    overlapping one already counted, the same text shifted, counts once) and at least `CONTEXT_LIFT`
    times as often as a window of the same length of the corpus holds them (`corpus_words`: each
    word's count in the index corpus). A topic latent of a middle layer fires on "the" and "to" in a
    text about influenza; its windows say "infectious", "virus", "symptoms". The `n` most common."""
    total = corpus_words.total
    if total == 0:
        return []
    kept: list[set[str]] = []
    lengths: list[int] = []
    windows = [ex for interval in feature.get("intervals") or [] for ex in interval["examples"]]
    for ex in (feature.get("top_examples") or []) + windows:
        words = {w for w in map(lens_word, ex["tokens"]) if len(w) >= 3 and w.isalpha()}
        if words and all(len(words & k) <= CONTEXT_OVERLAP * len(words) for k in kept):
            kept.append(words)
            lengths.append(len(ex["tokens"]))
    if len(kept) < 4:
        return []
    length = sum(lengths) / len(lengths)
    held = Counter(w for words in kept for w in words)
    chosen: list[tuple[int, float, str]] = []
    for word, df in held.items():
        if df < CONTEXT_SHARE * len(kept) or word not in corpus_words:  # not in the corpus: a piece of a
            continue  # word or a rare name, nothing a reader can check
        chance = 1.0 - (1.0 - corpus_words[word] / total) ** length  # a corpus window holds it
        if df / len(kept) >= CONTEXT_LIFT * chance:
            chosen.append((-df, chance, word))
    return [word for _, _, word in sorted(chosen)[:n]]  # the most held first, then the rarest


def baseline_explanation(feature: Mapping[str, Any], known_tokens: Collection[str] | None = None) -> str:
    """A one-line description of a latent from its feature-page data alone, led by what it fires on:
    the tokens it fires on most strongly (weighted by activation over its top examples) and those
    most of its firings are on (`firing_shares`), then the token that most often precedes its top
    examples when one does in at least half of them, then the tokens its logit lens promotes, only
    where the lens is coherent (`coherent_lens`: of the index corpus's words in `known_tokens` when
    given, or plain words; a lens token such as "मंत्रियों" in English Wikipedia says nothing a
    reader can check). When the named tokens cover less than `BROAD_SHARE` of its firings (a broad
    latent), what it is about leads: the words its windows are about (`context_words`, when
    `known_tokens` is the `CorpusWords` of the index corpus) and what it promotes, then that it
    fires on varied tokens (on what share of all tokens) and its strongest ones, so a label
    never claims a broad latent is about its peak tokens, and a list that cuts labels short (the
    microscope's) still shows its subject: `in text with "symptoms", "disease"; promotes
    "coronavirus"; fires on varied tokens (2.5% of all tokens), most strongly "infectious"`."""
    examples = feature.get("top_examples") or []
    if not examples:
        return "never fires on the index corpus"
    weight: dict[str, float] = {}
    before: Counter[str] = Counter()
    for ex in examples:
        weight[_focus(ex)] = weight.get(_focus(ex), 0.0) + float(ex["acts"][ex["focus"]])
        if ex["focus"] > 0:
            before[ex["tokens"][ex["focus"] - 1].strip() or ex["tokens"][ex["focus"] - 1]] += 1
    total = sum(weight.values()) or 1.0
    ranked = sorted(weight, key=lambda t: -weight[t])
    strongest = [t for t in ranked[:3] if weight[t] / total >= 0.1] or ranked[:1]
    shares, seen = firing_shares(feature)
    typical = [
        t
        for t in sorted(shares, key=lambda t: -shares[t])[:3]
        if shares[t] >= NAMED_SHARE and seen[t] >= NAMED_SEEN and t not in strongest
    ]
    named = strongest + typical[: max(0, 4 - len(strongest))]
    promoted: dict[str, str] = {}  # one form of each word: the first the lens ranks
    for token in coherent_lens(feature, known_tokens):
        promoted.setdefault(lens_word(token), token)
    promotes = ["promotes " + ", ".join(_quote(t) for t in list(promoted.values())[:3])] if promoted else []
    lead: list[str] = []
    if sum(shares.get(t, 0.0) for t in named) >= BROAD_SHARE:
        parts = ["fires on " + ", ".join(_quote(t) for t in named)]
    else:  # a broad latent: what it is about leads, so a list that cuts the label short keeps it
        density = float(feature.get("density") or 0.0)
        about = context_words(feature, known_tokens) if isinstance(known_tokens, CorpusWords) else []
        lead = ([f"in text with {', '.join(_quote(w) for w in about)}"] if about else []) + promotes
        promotes = []
        parts = [
            f"fires on varied tokens ({100 * density:.2g}% of all tokens), most strongly "
            + ", ".join(_quote(t) for t in strongest)
        ]
    if before:
        prev, count = before.most_common(1)[0]
        if count >= len(examples) / 2:
            parts.append(f"after {_quote(prev)}")
    parts = lead + parts + promotes
    return "; ".join(parts)


# ---------------------------------------------------------------------------------------------
# An OpenAI-compatible chat endpoint


@dataclass
class ChatEndpoint:
    """An OpenAI-compatible chat completions endpoint: `url` is its base (e.g.
    `http://127.0.0.1:8000/v1`, to which `/chat/completions` is added) or the full completions
    URL; `model` the model name it serves; `api_key` sent as a bearer token when given."""

    url: str
    model: str
    api_key: str | None = None
    timeout_s: float = 120.0

    def __post_init__(self) -> None:
        if not re.match(r"^https?://", self.url):
            raise ConfigError(f"chat endpoint URL {self.url!r} must start with http:// or https://")
        if not self.model:
            raise ConfigError("a chat endpoint needs a model name")

    @property
    def completions_url(self) -> str:
        url = self.url.rstrip("/")
        return url if url.endswith("/chat/completions") else url + "/chat/completions"

    def complete(self, prompt: str, max_tokens: int = 200) -> str:
        """The endpoint's reply to one user message, at temperature 0."""
        url = self.completions_url
        body = {
            "model": self.model,
            "messages": [{"role": "user", "content": prompt}],
            "temperature": 0,
            "max_tokens": max_tokens,
        }
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                raw = response.read()
        except urllib.error.HTTPError as err:
            detail = err.read()[:300].decode(errors="replace")
            raise GemmaScopeError(f"chat endpoint {url!r} answered HTTP {err.code}: {detail}") from err
        except (urllib.error.URLError, OSError) as err:
            reason = getattr(err, "reason", err)
            raise GemmaScopeError(f"cannot reach chat endpoint {url!r}: {reason}") from err
        try:
            return str(json.loads(raw)["choices"][0]["message"]["content"])
        except (ValueError, KeyError, IndexError, TypeError) as err:
            raise GemmaScopeError(
                f"chat endpoint {url!r} answered without choices[0].message.content: {raw[:300]!r}"
            ) from err


# ---------------------------------------------------------------------------------------------
# Model-written explanations and detection scoring


def window_text(example: Mapping[str, Any], mark: bool = False) -> str:
    """A window's text; with `mark`, the activating token wrapped as <<token>>."""
    tokens = list(example["tokens"])
    if mark:
        f = example["focus"]
        tokens[f] = f"<<{tokens[f]}>>"
    return "".join(tokens).replace("\n", " ").strip()


def explain_prompt(feature: Mapping[str, Any], n_shown: int) -> str:
    lines = [
        "We are studying one feature of a language model. Below are text excerpts where it activates "
        "most strongly; the token where it activates is marked <<like this>>.",
        "",
    ]
    for i, ex in enumerate((feature.get("top_examples") or [])[:n_shown], start=1):
        lines.append(f"{i}. {window_text(ex, mark=True)}")
    promoted = agreeing_lens(feature)
    if promoted:
        lines += [
            "",
            "Tokens it makes more likely next: " + ", ".join(_quote(p["token"]) for p in promoted[:10]),
        ]
    lines += [
        "",
        "In one short phrase (at most 12 words), what does this feature detect? Reply with the phrase only.",
    ]
    return "\n".join(lines)


def detection_prompt(explanation: str, texts: Sequence[str]) -> str:
    lines = [
        f'A feature of a language model is described as: "{explanation}".',
        "For each numbered text below, decide whether the feature is active somewhere in it.",
        "",
    ]
    lines += [f"{i}. {t}" for i, t in enumerate(texts, start=1)]
    lines += [
        "",
        f"Reply with a JSON list of {len(texts)} numbers in order, 1 where the feature is active and 0 "
        "where it is not, for example [1, 0, 1]. Reply with the list only.",
    ]
    return "\n".join(lines)


def parse_labels(reply: str, n: int) -> list[int] | None:
    """The first JSON list of `n` zeros and ones in a reply, or None."""
    for match in re.finditer(r"\[[^\[\]]*\]", reply):
        try:
            values = json.loads(match.group(0))
        except ValueError:
            continue
        if isinstance(values, list) and len(values) == n and all(v in (0, 1, True, False) for v in values):
            return [int(v) for v in values]
    return None


def detection_score(
    endpoint: ChatEndpoint, explanation: str, texts: Sequence[str], truth: Sequence[bool]
) -> float | None:
    """Balanced accuracy of the endpoint predicting, from the explanation alone, which texts the
    latent fires in (`truth`). None when the reply is not a list of `len(texts)` labels or when
    the texts are all positive or all negative."""
    if len(texts) != len(truth):
        raise ConfigError(f"{len(texts)} texts but {len(truth)} labels")
    n_pos = sum(truth)
    n_neg = len(truth) - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    labels = parse_labels(endpoint.complete(detection_prompt(explanation, texts)), len(texts))
    if labels is None:
        return None
    tp = sum(1 for label, t in zip(labels, truth, strict=True) if t and label)
    tn = sum(1 for label, t in zip(labels, truth, strict=True) if not t and not label)
    return 0.5 * (tp / n_pos + tn / n_neg)


def _clean_explanation(reply: str) -> str:
    lines = [line.strip() for line in reply.strip().splitlines() if line.strip()]
    text = lines[0] if lines else ""
    return text.strip(" \"'`*").removeprefix("This feature detects ").strip()[:300]


def scoring_set(
    index: FeatureIndex,
    sae_id: str,
    latent: int,
    feature: Mapping[str, Any],
    n_shown: int,
    n_scored: int,
    rng: random.Random,
) -> tuple[list[str], list[bool]]:
    """Held-out texts for detection scoring, shuffled: up to `n_scored` windows where the latent
    fires that the explainer was not shown (its top examples after the first `n_shown`, and its
    interval samples) and as many random index windows where it does not fire anywhere."""
    shown = {window_text(ex) for ex in (feature.get("top_examples") or [])[:n_shown]}
    candidates = list((feature.get("top_examples") or [])[n_shown:])
    for interval in feature.get("intervals") or []:
        candidates += interval["examples"]
    positives = sorted({window_text(ex) for ex in candidates} - shown)
    rng.shuffle(positives)
    positives = positives[:n_scored]
    negatives = [
        window_text({"tokens": tokens, "focus": 0})
        for tokens, latents in index.null_windows(sae_id)
        if not _contains(latents, latent)
    ]
    rng.shuffle(negatives)
    negatives = negatives[: len(positives)]
    items = [(t, True) for t in positives] + [(t, False) for t in negatives]
    rng.shuffle(items)
    return [t for t, _ in items], [label for _, label in items]


def _contains(sorted_latents: Any, latent: int) -> bool:
    i = int(sorted_latents.searchsorted(latent))
    return i < len(sorted_latents) and int(sorted_latents[i]) == latent


def explain_with_llm(
    index: FeatureIndex,
    sae_id: str,
    latents: Sequence[int],
    endpoint: ChatEndpoint,
    n_shown: int = 10,
    n_scored: int = 5,
    score: bool = True,
    score_baseline: bool = True,
    seed: int = 0,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Ask the endpoint to explain each latent from its top `n_shown` windows and logit-lens tokens,
    score the explanation by detection on held-out windows (and the baseline explanation too, with
    `score_baseline`), and store both in the index under explainer `llm:MODEL`. Latents that never
    fired are skipped. Returns `[{index, explanation, score, baseline, baseline_score}]`."""
    if n_shown < 1 or n_scored < 1:
        raise ConfigError(f"n_shown={n_shown} and n_scored={n_scored} must be at least 1")
    rng = random.Random(seed)
    explainer = f"llm:{endpoint.model}"
    results = []
    for latent in tqdm(list(latents), desc=f"explaining {sae_id}", unit="latent", disable=not progress):
        feature = index.feature(sae_id, int(latent))
        if not feature["top_examples"]:
            continue
        text = _clean_explanation(endpoint.complete(explain_prompt(feature, n_shown)))
        if not text:
            continue
        result: dict[str, Any] = {"index": int(latent), "explanation": text, "score": None}
        texts, truth = (
            scoring_set(index, sae_id, int(latent), feature, n_shown, n_scored, rng) if score else ([], [])
        )
        if texts:
            result["score"] = detection_score(endpoint, text, texts, truth)
        index.set_explanations(sae_id, [(int(latent), text, result["score"])], explainer, endpoint.model)
        baseline = next((e for e in feature["explanations"] if e["explainer"] == BASELINE), None)
        if baseline is not None:
            result["baseline"] = baseline["text"]
            if score_baseline and texts:
                result["baseline_score"] = detection_score(endpoint, baseline["text"], texts, truth)
                index.set_explanations(sae_id, [(int(latent), baseline["text"], result["baseline_score"])])
        results.append(result)
    return results
