"""The library's caption metrics: one tokenisation and one BLEU/CIDEr/ROUGE-L for eval, batch and server,
equal to pycocoevalcap's (PTBTokenizer + scorers) wherever pycocoevalcap and Java are installed."""

from __future__ import annotations

import contextlib
import io
import shutil

import numpy as np
import pytest

from reefcap.models.errors import ReefcapError
from reefcap.models.metrics import bleu, bleu4_cider, cider, coco_metrics, degenerate_reason, rouge_l, tokenize

# Captions with what PTBTokenizer (CoreNLP 3.4.1, -lowerCase) and pycocoevalcap's punctuation list make of them,
# recorded from a run of pycocoevalcap's PTBTokenizer.
PTB = {
    "A diver's torch lights the reef.": "a diver 's torch lights the reef",
    "Don't touch the coral!": "do n't touch the coral",
    "The fish can't swim; it's \"stuck\" (maybe).": "the fish ca n't swim it 's stuck -lrb- maybe -rrb-",
    "a close-up of a sea-fan, 3.5 m deep -- at 10:30 a.m.": "a close-up of a sea-fan 3.5 m deep at 10:30 a.m.",
    "Two fish & a turtle / ray near the U.S. wreck...": "two fish & a turtle / ray near the u.s. wreck",
    "1,000 fish, e.g. a ray [left]": "1,000 fish e.g. a ray -lsb- left -rsb-",
    "divers' fins 'quoted' `back` ``double''": "divers fins quoted back double",
    "  leading   spaces and trailing   ": "leading spaces and trailing",
    "i'm sure they're here and we'll see": "i 'm sure they 're here and we 'll see",
    "fish!!! ??": "fish !!! ??",
    "": "",
}
VOCABULARY = "a an the fish turtle ray coral reef swimming over near sand blue green murky water two small"
WORDS = VOCABULARY.split()


def random_captions(seed: int, n: int) -> tuple[dict[int, list[str]], dict[int, list[str]]]:
    """Tokenised references (1-5 each, some empty) and one hypothesis (some empty) per id."""
    rng = np.random.default_rng(seed)

    def caption(lo: int) -> str:
        return " ".join(rng.choice(WORDS, size=int(rng.integers(lo, 13))))

    refs = {i: [caption(0 if i % 7 == 0 else 1) for _ in range(int(rng.integers(1, 6)))] for i in range(n)}
    return refs, {i: [caption(0)] for i in range(n)}


@pytest.mark.parametrize(("text", "tokens"), PTB.items())
def test_tokenize_matches_ptb_tokenizer(text, tokens):
    assert tokenize(text) == tokens


@pytest.mark.skipif(shutil.which("java") is None, reason="PTBTokenizer needs Java")
def test_tokenize_matches_pycocoevalcap_ptb_tokenizer_live():
    ptb = pytest.importorskip("pycocoevalcap.tokenizer.ptbtokenizer")
    texts = [t for t in PTB if t] + [" ".join(r) for r in random_captions(3, 30)[0].values() if r[0]]
    with contextlib.redirect_stdout(io.StringIO()):
        out = ptb.PTBTokenizer().tokenize({i: [{"caption": t}] for i, t in enumerate(texts)})
    assert [tokenize(t) for t in texts] == [out[i][0] for i in range(len(texts))]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_scorers_equal_pycocoevalcap_on_the_same_tokens(seed):
    pytest.importorskip("pycocoevalcap")
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    refs, hyps = random_captions(seed, 60)
    expected_bleu, _ = Bleu(4).compute_score(refs, hyps, verbose=0)
    assert bleu(refs, hyps) == pytest.approx(expected_bleu, rel=1e-12, abs=1e-15)
    assert cider(refs, hyps) == pytest.approx(Cider().compute_score(refs, hyps)[0], rel=1e-12)
    assert rouge_l(refs, hyps) == pytest.approx(Rouge().compute_score(refs, hyps)[0], rel=1e-12)


def test_server_scores_are_eval_scores():
    refs = {1: ["A diver's torch lights the reef."], 2: ["Two turtles over the sand", "turtles on sand"]}
    preds = {1: "a diver's torch lighting a reef", 2: "two turtles swimming over sand"}
    full = coco_metrics(preds, refs, meteor=False)
    fast = bleu4_cider(preds, refs)
    assert round(fast["Bleu_4"], 6) == full["Bleu_4"] and round(fast["CIDEr"], 6) == full["CIDEr"]


def test_empty_captions_score_zero_without_errors():
    assert bleu4_cider({1: "..."}, {1: ["!"]}) == {"Bleu_4": pytest.approx(0.0, abs=1e-6), "CIDEr": 0.0}
    with pytest.raises(ReefcapError, match="no reference"):
        coco_metrics({1: "a fish"}, {2: ["a fish"]}, meteor=False)


def test_degenerate_reason():
    assert degenerate_reason("") == "empty"
    assert degenerate_reason("a fish a fish a fish") == "repetition"
    assert degenerate_reason("a turtle swimming over a coral reef") is None
