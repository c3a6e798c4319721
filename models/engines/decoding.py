"""Greedy and beam-search decoding over a KV-cached decoder step, in numpy, matching Hugging Face ``generate``.

Both take a ``step(tokens, beam_idx) -> logits`` callable: ``tokens (R, T)`` are the new tokens of every row,
``beam_idx (R,)`` says which cached row each row continues (the caller reorders its cache accordingly), and
the result is the last position's raw logits ``(R, vocab)`` as float32. The decoding rules follow
transformers 5.x so that an exported model decodes exactly as ``BlipForConditionalGeneration.generate``:

- ``max_length``/``min_length`` count the prompt; below ``min_length`` EOS is forbidden.
- The repetition penalty divides positive and multiplies negative scores of tokens already in the sequence
  (greedy: on the logits; beam search: on the log-probabilities, as HF applies processors after log-softmax).
- Beam search is HF's vectorised algorithm: 2K candidates per image, finished hypotheses scored by the sum of
  log-probabilities over ``generated_length ** length_penalty``, and its early-stopping heuristic.

Each row's confidence is the mean raw log-probability of its generated tokens up to and including EOS.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

Step = Callable[[np.ndarray, np.ndarray], np.ndarray]
NEG = np.float32(-1.0e9)  # HF's "impossible" score, kept in float32 so ties and rounding behave the same


@dataclass(frozen=True)
class Decoded:
    """Per image: full token ids (prompt + generated), mean log-probability and number of counted tokens."""

    sequences: list[list[int]]
    confidences: list[float]
    lengths: list[int]


def log_softmax(x: np.ndarray) -> np.ndarray:
    shifted = x - x.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def _penalise(scores: np.ndarray, seen: np.ndarray, penalty: float) -> None:
    rows = np.arange(scores.shape[0])[:, None]
    picked = scores[rows, seen]
    scores[rows, seen] = np.where(picked < 0, picked * penalty, picked / penalty)


def _summarise(prompt_len: int, seqs: np.ndarray, logps: np.ndarray, lengths: np.ndarray, eos: int) -> Decoded:
    out_seqs, confs, counts = [], [], []
    for seq, lp, n in zip(seqs, logps, lengths, strict=True):
        gen = seq[prompt_len : prompt_len + n]
        stop = np.flatnonzero(gen == eos)
        k = int(stop[0]) + 1 if stop.size else len(gen)
        out_seqs.append([int(t) for t in seq[: prompt_len + k]])
        confs.append(round(float(lp[:k].mean()) if k else 0.0, 6))
        counts.append(k)
    return Decoded(out_seqs, confs, counts)


def greedy(
    step: Step,
    prompt: Sequence[int],
    n: int,
    *,
    max_length: int,
    min_length: int,
    repetition_penalty: float,
    eos: int,
    pad: int,
    compact: bool = False,
) -> Decoded:
    """Greedy decoding of ``n`` images that all start from ``prompt``.

    With ``compact`` a row that has ended (EOS) leaves the decoder: later steps get only the unfinished rows
    (``beam_idx`` then names the rows kept, in order; the step must drop the same rows of anything else it
    holds per row), so a batch pays for the tokens it generates rather than rows x its longest caption.
    Rows never depend on each other, so the tokens are those of the full batch (up to float rounding, and
    an int8 export's per-batch activation scales, which also move with which images share a batch)."""
    rows = np.arange(n)
    seqs = np.tile(np.asarray(prompt, dtype=np.int64), (n, 1))
    logits = step(seqs, rows)
    live = rows  # the batch row each decoder row belongs to
    done = np.zeros(n, dtype=bool)
    logps: list[np.ndarray] = []
    while True:
        scores = logits.copy()
        if repetition_penalty != 1.0:
            _penalise(scores, seqs[live], repetition_penalty)
        if seqs.shape[1] < min_length:
            scores[:, eos] = -np.inf
        picked = scores.argmax(axis=-1)
        token = np.full(n, pad, dtype=np.int64)
        token[live] = np.where(done[live], pad, picked)
        logp = np.zeros(n, dtype=np.float32)
        logp[live] = log_softmax(logits)[np.arange(len(live)), token[live]]
        logps.append(logp)
        seqs = np.concatenate([seqs, token[:, None]], axis=1)
        done[live] |= token[live] == eos
        if done.all() or seqs.shape[1] >= max_length:
            break
        keep = np.arange(len(live))
        if compact and done[live].any():
            keep = np.flatnonzero(~done[live])
            live = live[keep]
        logits = step(token[live][:, None], keep)
    generated = seqs.shape[1] - len(prompt)
    return _summarise(len(prompt), seqs, np.stack(logps, axis=1), np.full(n, generated), eos)


class _Beams:
    """Beam search's state for ``n`` images, HF's arrays one for one: K running beams and K finished
    hypotheses per image, each with its tokens, per-token raw log-probabilities and score."""

    def __init__(self, prompt: Sequence[int], n: int, k: int, max_length: int, eos: int):
        p = len(prompt)
        self.n, self.k, self.p, self.eos = n, k, p, eos
        self.k2 = 2 * k  # HF keeps max(2, 1 + number of EOS ids) * num_beams candidates
        width = max(max_length, p + 1)
        self.img = np.arange(n)[:, None]
        self.run_seq = np.full((n, k, width), eos, dtype=np.int64)
        self.run_seq[:, :, :p] = np.asarray(prompt, dtype=np.int64)
        self.run_lp = np.zeros((n, k, width - p), dtype=np.float32)  # raw log-prob of each generated token
        self.run_score = np.zeros((n, k), dtype=np.float32)
        self.run_score[:, 1:] = NEG  # all beams start identical: only the first may expand at step one
        self.fin_seq, self.fin_lp = self.run_seq.copy(), self.run_lp.copy()
        self.fin_score = np.full((n, k), NEG, dtype=np.float32)
        self.fin_done = np.zeros((n, k), dtype=bool)
        self.fin_len = np.zeros((n, k), dtype=np.int64)
        self.improvable = np.ones(n, dtype=bool)
        self.top_mask = np.arange(self.k2) < k

    def candidates(self, logits: np.ndarray, cur: int, repetition_penalty: float, min_length: int):
        """The 2K best continuations of each image's running beams: (scores, sequences, log-probs, tokens, parents)."""
        n, k, p, img = self.n, self.k, self.p, self.img
        vocab = logits.shape[-1]
        raw = log_softmax(logits)
        scores = raw.copy()
        if repetition_penalty != 1.0:
            _penalise(scores, self.run_seq[:, :, :cur].reshape(n * k, cur), repetition_penalty)
        if cur < min_length:
            scores[:, self.eos] = -np.inf
        acc = (scores.reshape(n, k, vocab) + self.run_score[:, :, None]).reshape(n, k * vocab)
        top = np.argsort(-acc, axis=1, kind="stable")[:, : self.k2]
        top_score = np.take_along_axis(acc, top, axis=1)
        parent, token = top // vocab, top % vocab
        cand_seq = self.run_seq[img, parent]
        cand_seq[:, :, cur] = token
        cand_lp = self.run_lp[img, parent]
        cand_lp[:, :, cur - p] = raw.reshape(n, k, vocab)[img, parent, token]
        return top_score, cand_seq, cand_lp, token, parent

    def keep_running(self, top_score, hits, cand_seq, cand_lp, parent) -> np.ndarray:
        """Running beams become the best K candidates that did not just finish; returns the cache rows they
        continue (``beam_idx``)."""
        img, k = self.img, self.k
        masked = top_score + hits.astype(np.float32) * NEG
        keep = np.argsort(-masked, axis=1, kind="stable")[:, :k]
        beam_idx = (img * k + parent[img, keep]).reshape(-1)
        self.run_seq, self.run_lp, self.run_score = cand_seq[img, keep], cand_lp[img, keep], masked[img, keep]
        return beam_idx

    def add_finished(self, top_score, hits, cand_seq, cand_lp, cur: int, length_penalty: float, early_stopping):
        """Finished hypotheses: only candidates among the top K may enter, scored with the length penalty."""
        n, k, p, img = self.n, self.k, self.p, self.img
        new_score = top_score / np.float32((cur + 1 - p) ** length_penalty)
        if early_stopping is True:
            new_score = new_score + self.fin_done.all(axis=1, keepdims=True).astype(np.float32) * NEG
        new_score = new_score + (~self.improvable)[:, None].astype(np.float32) * NEG
        just = hits & self.top_mask[None, :]
        new_score = new_score + (~just).astype(np.float32) * NEG
        merged_score = np.concatenate([self.fin_score, new_score], axis=1)
        best = np.argsort(-merged_score, axis=1, kind="stable")[:, :k]
        self.fin_seq = np.concatenate([self.fin_seq, cand_seq], axis=1)[img, best]
        self.fin_lp = np.concatenate([self.fin_lp, cand_lp], axis=1)[img, best]
        self.fin_len = np.concatenate([self.fin_len, np.full((n, self.k2), cur + 1 - p)], axis=1)[img, best]
        self.fin_done = np.concatenate([self.fin_done, just], axis=1)[img, best]
        self.fin_score = merged_score[img, best]

    def update_improvable(self, cur: int, max_length: int, length_penalty: float, early_stopping) -> None:
        """HF's heuristic: can the best running beam still beat the worst finished one?"""
        hyp = (max_length if early_stopping == "never" and length_penalty > 0 else cur) - self.p
        best_running = self.run_score[:, :1] / np.float32(hyp**length_penalty)
        worst_finished = np.where(self.fin_done, self.fin_score.min(axis=1, keepdims=True), NEG)
        self.improvable &= (best_running > worst_finished).any(axis=1)


def beam_search(
    step: Step,
    prompt: Sequence[int],
    n: int,
    *,
    num_beams: int,
    max_length: int,
    min_length: int,
    repetition_penalty: float,
    eos: int,
    length_penalty: float = 1.0,
    early_stopping: bool | str = False,
) -> Decoded:
    """HF-equivalent beam search (one returned sequence per image) for ``n`` images starting from ``prompt``."""
    k, p = num_beams, len(prompt)
    beams = _Beams(prompt, n, k, max_length, eos)
    logits = step(beams.run_seq[:, :, :p].reshape(n * k, p), np.arange(n * k))
    cur = p
    while True:
        top_score, cand_seq, cand_lp, token, parent = beams.candidates(logits, cur, repetition_penalty, min_length)
        hits = (token == eos) | (cur + 1 >= max_length)
        beam_idx = beams.keep_running(top_score, hits, cand_seq, cand_lp, parent)
        beams.add_finished(top_score, hits, cand_seq, cand_lp, cur, length_penalty, early_stopping)
        cur += 1
        beams.update_improvable(cur, max_length, length_penalty, early_stopping)
        open_beams = not (beams.fin_done.all() and early_stopping is True)
        if not (beams.improvable.any() and open_beams and not hits.all()):
            break
        logits = step(beams.run_seq[:, :, cur - 1].reshape(n * k, 1), beam_idx)
    return _summarise(p, beams.fin_seq[:, 0], beams.fin_lp[:, 0], beams.fin_len[:, 0], eos)
