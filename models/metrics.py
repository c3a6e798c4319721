"""Caption metrics, one implementation for every caller: ``reefcap eval`` and training's validation, the
batch CLI's ``--references`` and the server's rolling feedback scores.

- One tokenisation (:func:`tokenize`): what pycocoevalcap's PTBTokenizer (Stanford CoreNLP 3.4.1, lower-cased,
  punctuation tokens dropped) does to captions, in Python, so scoring needs neither Java nor pycocoevalcap.
- One BLEU-1..4 and one CIDEr (CIDEr-D: n = 4, sigma = 6, idf from the scored set's references):
  pycocoevalcap's formulas ported line for line, including their quirks (BLEU's "closest" reference length
  and smoothing constants, CIDEr's length penalty counting bigrams), so the numbers are pycocoevalcap's on
  the same tokens (``tests/test_metrics.py`` checks this against pycocoevalcap itself). ROUGE-L likewise.
  METEOR alone needs pycocoevalcap and Java (the ``train`` extra), imported only when asked for.
- One definition of a degenerate caption (:func:`degenerate_reason`) and the set-level collapse indicators.

Metric keys are pycocoevalcap's (``Bleu_1``..``Bleu_4``, ``METEOR``, ``ROUGE_L``, ``CIDEr``); scores are
fractions, as pycocoevalcap reports them (BLIP's paper-style CIDEr 114.9 is 1.149 here).
"""

from __future__ import annotations

import contextlib
import io
import math
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

from reefcap.models.errors import ReefcapError

METRIC_KEYS = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr")
COLLAPSE_KEYS = ("repetition_rate", "distinct_2", "empty_or_one_word", "unique_captions")

# --- tokenisation ---------------------------------------------------------------------------------------

# PTBTokenizer splits clitics off their word ("don't" -> "do n't", "diver's" -> "diver 's").
_CLITIC = re.compile(r"(?<=[^\W_])(n't|'s|'re|'ve|'ll|'m|'d)\b")
# Its tokens, as far as captions go: clitics; acronyms with their dots ("u.s.", "e.g."); words keeping inner
# hyphens, dots, slashes, ampersands and apostrophes ("close-up", "3.5", "o'clock"), and commas or colons
# between digits ("1,000", "10:30"); runs of ! or ?; any other character alone.
_TOKEN = re.compile(
    r"n't|'(?:s|re|ve|ll|m|d)\b|(?:[^\W\d_]\.){2,}|[^\W_]+(?:(?:[-./&']|(?<=\d)[,:](?=\d))[^\W_]+)*|[!?]{2,}|\S"
)
# Brackets become PTB's bracket tokens; lower-cased, they escape pycocoevalcap's (upper-case) punctuation list.
_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
# pycocoevalcap's PUNCTUATIONS, plus the quote characters PTBTokenizer turns into `` and '' (dropped too).
_DROPPED = frozenset(["''", "'", "``", "`", ".", "?", "!", ",", ":", "-", "--", "...", ";"])
_DROPPED |= {'"', "\u2018", "\u2019", "\u201c", "\u201d"}


def tokenize(text: str) -> str:
    """Lower-cased PTB tokens of a caption without punctuation, joined by single spaces: what pycocoevalcap's
    PTBTokenizer gives (without Java), identical on every caption this project's tests and ReefScenes hold."""
    tokens = _TOKEN.findall(_CLITIC.sub(r" \1", text.lower()))
    return " ".join(_BRACKETS.get(t, t) for t in tokens if t not in _DROPPED)


# --- BLEU, CIDEr, ROUGE-L on tokenised captions (``{id: [caption]}`` and ``{id: [references...]}``) ------------


def ngrams(words: Sequence[str], n: int = 4) -> Counter:
    """Counts of every 1- to ``n``-gram of ``words`` (BLEU's and CIDEr's shared statistics)."""
    return Counter(tuple(words[i : i + k]) for k in range(1, n + 1) for i in range(len(words) - k + 1))


def bleu_stats(refs: Sequence[str], hyp: str, n: int = 4) -> tuple[int, int, list[int], list[int]]:
    """One image's share of corpus BLEU: (hypothesis length, chosen reference length, clipped matches per
    order, hypothesis n-grams per order). Corpus BLEU sums these over images (:func:`bleu_from_stats`)."""
    words = hyp.split()
    max_ref: Counter = Counter()
    lengths = []
    for ref in refs:
        ref_words = ref.split()
        lengths.append(len(ref_words))
        max_ref |= ngrams(ref_words, n)  # per n-gram, the most any one reference has
    correct = [0] * n
    for gram, count in ngrams(words, n).items():
        correct[len(gram) - 1] += min(max_ref[gram], count)
    ref_len = min((abs(length - len(words)), length) for length in lengths)[1]
    return len(words), ref_len, correct, [max(0, len(words) - k) for k in range(n)]


def bleu_from_stats(test_len: int, ref_len: int, correct: Sequence[int], guess: Sequence[int]) -> list[float]:
    """Corpus BLEU-1..n from summed :func:`bleu_stats`, with pycocoevalcap's smoothing constants."""
    tiny, small = 1e-15, 1e-9  # pycocoevalcap's: a zero match count gives 0, never a division by zero
    scores, product = [], 1.0
    for k in range(len(correct)):
        product *= (correct[k] + tiny) / (guess[k] + small)
        scores.append(product ** (1.0 / (k + 1)))
    ratio = (test_len + tiny) / (ref_len + small)
    if ratio < 1:  # brevity penalty
        scores = [s * math.exp(1 - 1 / ratio) for s in scores]
    return scores


def bleu(refs: Mapping[Any, Sequence[str]], hyps: Mapping[Any, Sequence[str]], n: int = 4) -> list[float]:
    """Corpus BLEU-1..n as pycocoevalcap computes it: clipped n-gram matches summed over the set, the reference
    length closest to each hypothesis's (the shorter on a tie), and its smoothing constants."""
    correct, guess = [0] * n, [0] * n
    test_len = ref_len = 0
    for key, (hyp,) in hyps.items():
        t, r, c, g = bleu_stats(refs[key], hyp, n)
        test_len, ref_len = test_len + t, ref_len + r
        correct = [a + b for a, b in zip(correct, c, strict=True)]
        guess = [a + b for a, b in zip(guess, g, strict=True)]
    return bleu_from_stats(test_len, ref_len, correct, guess)


def _tfidf(counts: Counter, doc_freq: Counter, log_refs: float, n: int) -> tuple[list[dict], list[float], int]:
    vec: list[dict] = [{} for _ in range(n)]
    norm = [0.0] * n
    length = 0
    for gram, tf in counts.items():
        k = len(gram) - 1
        vec[k][gram] = float(tf) * (log_refs - math.log(max(1.0, doc_freq[gram])))
        norm[k] += vec[k][gram] ** 2
        if k == 1:  # pycocoevalcap's CIDEr counts bigrams as the length the Gaussian penalty compares; kept
            length += tf
    return vec, [math.sqrt(x) for x in norm], length


def cider_image(
    hyp: Counter, refs: Sequence[Counter], doc_freq: Counter, log_refs: float, n: int = 4, sigma: float = 6.0
) -> float:
    """One image's CIDEr-D (x10, as pycocoevalcap) from n-gram counts, given the set's document frequencies
    and log of its image count; the set's CIDEr is the mean over its images."""
    vec, norm, length = _tfidf(hyp, doc_freq, log_refs, n)
    score = [0.0] * n
    for counts in refs:
        vec_r, norm_r, length_r = _tfidf(counts, doc_freq, log_refs, n)
        penalty = math.e ** (-(float(length - length_r) ** 2) / (2 * sigma**2))
        for k in range(n):
            val = sum(min(w, vec_r[k].get(g, 0.0)) * vec_r[k].get(g, 0.0) for g, w in vec[k].items())
            if norm[k] != 0 and norm_r[k] != 0:
                val /= norm[k] * norm_r[k]
            score[k] += val * penalty
    return sum(score) / n / len(refs) * 10.0


def cider(
    refs: Mapping[Any, Sequence[str]], hyps: Mapping[Any, Sequence[str]], n: int = 4, sigma: float = 6.0
) -> float:
    """CIDEr-D as pycocoevalcap computes it; document frequencies come from the references of this set."""
    ref_counts = {key: [ngrams(r.split(), n) for r in refs[key]] for key in hyps}
    doc_freq: Counter = Counter()
    for counts in ref_counts.values():
        doc_freq.update({gram for c in counts for gram in c})
    if not hyps:
        return 0.0
    log_refs = math.log(float(len(hyps)))
    total = sum(
        cider_image(ngrams(hyp.split(), n), ref_counts[key], doc_freq, log_refs, n, sigma)
        for key, (hyp,) in hyps.items()
    )
    return total / len(hyps)


def _lcs(a: Sequence[str], b: Sequence[str]) -> int:
    row = [0] * (len(b) + 1)
    for x in a:
        prev = 0
        for j, y in enumerate(b, 1):
            prev, row[j] = row[j], prev + 1 if x == y else max(row[j], row[j - 1])
    return row[-1]


def rouge_l(refs: Mapping[Any, Sequence[str]], hyps: Mapping[Any, Sequence[str]], beta: float = 1.2) -> float:
    """ROUGE-L as pycocoevalcap computes it: per image, the best LCS precision and recall over the references
    (taken separately), their F-measure with ``beta``; the mean over images."""
    scores = []
    for key, (hyp,) in hyps.items():
        cand = hyp.split(" ")
        lcs = [(_lcs(r.split(" "), cand), len(r.split(" "))) for r in refs[key]]
        prec = max(m / len(cand) for m, _ in lcs)
        rec = max(m / n for m, n in lcs)
        f = (1 + beta**2) * prec * rec / (rec + beta**2 * prec) if prec and rec else 0.0
        scores.append(f)
    return sum(scores) / len(scores) if scores else 0.0


def _meteor(refs: Mapping[Any, Sequence[str]], hyps: Mapping[Any, Sequence[str]]) -> float:
    try:
        from pycocoevalcap.meteor.meteor import Meteor
    except ImportError as exc:
        raise ReefcapError(f"METEOR needs pycocoevalcap and Java: pip install 'reefcap[train]' ({exc})") from None
    scorer = Meteor()
    try:
        # pycocoevalcap prints progress to stdout, which would corrupt the JSON the CLI prints there.
        with contextlib.redirect_stdout(io.StringIO()):
            score, _ = scorer.compute_score(dict(refs), dict(hyps))
        return float(score)
    finally:
        # The METEOR scorer keeps a Java subprocess; end it now rather than at interpreter exit.
        proc = getattr(scorer, "meteor_p", None)
        if proc is not None:
            with contextlib.suppress(Exception):
                proc.stdin.close()
                proc.kill()
                proc.wait(timeout=5)


def tokenized(
    predictions: Mapping[Any, str], references: Mapping[Any, Sequence[str]]
) -> tuple[dict[Any, list[str]], dict[Any, list[str]]]:
    """(references, predictions) tokenised, in the ``{id: [captions]}`` shape the scorers take."""
    if not predictions:
        raise ReefcapError("no predictions to evaluate")
    missing = [k for k in predictions if not references.get(k)]
    if missing:
        raise ReefcapError(f"{len(missing)} predictions have no reference captions (first: {missing[0]!r})")
    refs = {k: [tokenize(r) for r in references[k]] for k in predictions}
    return refs, {k: [tokenize(p)] for k, p in predictions.items()}


def bleu4_cider(predictions: Mapping[Any, str], references: Mapping[Any, Sequence[str]]) -> dict[str, float]:
    """BLEU-4 and CIDEr of one caption per id against that id's references (what the server keeps rolling)."""
    refs, hyps = tokenized(predictions, references)
    return {"Bleu_4": bleu(refs, hyps)[3], "CIDEr": cider(refs, hyps)}


def coco_metrics(
    predictions: Mapping[Any, str], references: Mapping[Any, Sequence[str]], meteor: bool = True
) -> dict[str, float]:
    """BLEU-1..4, ROUGE-L, CIDEr (and METEOR unless ``meteor=False``) of one caption per id against that id's
    references, rounded to 6 digits."""
    refs, hyps = tokenized(predictions, references)
    out = {f"Bleu_{k + 1}": s for k, s in enumerate(bleu(refs, hyps))}
    if meteor:
        out["METEOR"] = _meteor(refs, hyps)
    out["ROUGE_L"] = rouge_l(refs, hyps)
    out["CIDEr"] = cider(refs, hyps)
    return {k: round(float(v), 6) for k, v in out.items()}


# --- decoding collapse ----------------------------------------------------------------------------------


def degenerate_reason(text: str) -> str | None:
    """ "empty" or "repetition" for a collapsed caption, else None.

    Repetition: one word, pair or triple of words repeated three times in a row ("coral coral coral",
    "a fish a fish a fish"), or a caption of 8+ words with fewer than 40% distinct.
    """
    words = text.lower().split()
    if not words:
        return "empty"
    for n in (1, 2, 3):
        for i in range(len(words) - 3 * n + 1):
            if words[i : i + n] == words[i + n : i + 2 * n] == words[i + 2 * n : i + 3 * n]:
                return "repetition"
    if len(words) >= 8 and len(set(words)) / len(words) < 0.4:
        return "repetition"
    return None


def collapse_metrics(captions: Sequence[str]) -> dict[str, float]:
    """Indicators of degenerate decoding over a set of captions.

    - ``repetition_rate``: share of captions whose :func:`degenerate_reason` is "repetition": the same rule
      the server and ``reefcap caption`` use to hand a caption to the fallback, so the number an evaluation
      reports is the share the policy would replace. (An earlier, looser count flagged any repeated bigram or
      doubled word, which ordinary captions such as "a fish next to a fish" have; it is gone.)
    - ``empty_or_one_word``: share of captions with at most one word. Empty captions count here, never in
      ``repetition_rate`` (``degenerate_reason`` calls them "empty").
    - ``distinct_2``: distinct word bigrams / all word bigrams over the set (low = the same phrases everywhere).
    - ``unique_captions``: distinct captions / captions.
    """
    n = len(captions)
    if n == 0:
        return dict.fromkeys(COLLAPSE_KEYS, 0.0)
    repeated = sum(degenerate_reason(cap) == "repetition" for cap in captions)
    short = 0
    bigrams: list[tuple[str, str]] = []
    for cap in captions:
        words = cap.lower().split()
        short += len(words) <= 1
        bigrams += list(zip(words, words[1:], strict=False))
    return {
        "repetition_rate": round(repeated / n, 6),
        "distinct_2": round(len(set(bigrams)) / len(bigrams), 6) if bigrams else 0.0,
        "empty_or_one_word": round(short / n, 6),
        "unique_captions": round(len({c.strip().lower() for c in captions}) / n, 6),
    }
