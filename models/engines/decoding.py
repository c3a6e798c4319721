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
    k2 = 2 * k  # HF keeps max(2, 1 + number of EOS ids) * num_beams candidates
    width = max(max_length, p + 1)
    img = np.arange(n)[:, None]
    run_seq = np.full((n, k, width), eos, dtype=np.int64)
    run_seq[:, :, :p] = np.asarray(prompt, dtype=np.int64)
    run_lp = np.zeros((n, k, width - p), dtype=np.float32)  # raw log-prob of each generated token
    run_score = np.zeros((n, k), dtype=np.float32)
    run_score[:, 1:] = NEG  # all beams start identical: only the first may expand at step one
    fin_seq, fin_lp = run_seq.copy(), run_lp.copy()
    fin_score = np.full((n, k), NEG, dtype=np.float32)
    fin_done = np.zeros((n, k), dtype=bool)
    fin_len = np.zeros((n, k), dtype=np.int64)
    improvable = np.ones(n, dtype=bool)
    top_mask = np.arange(k2) < k

    logits = step(run_seq[:, :, :p].reshape(n * k, p), np.arange(n * k))
    cur = p
    while True:
        vocab = logits.shape[-1]
        raw = log_softmax(logits)
        scores = raw.copy()
        if repetition_penalty != 1.0:
            _penalise(scores, run_seq[:, :, :cur].reshape(n * k, cur), repetition_penalty)
        if cur < min_length:
            scores[:, eos] = -np.inf
        acc = (scores.reshape(n, k, vocab) + run_score[:, :, None]).reshape(n, k * vocab)
        top = np.argsort(-acc, axis=1, kind="stable")[:, :k2]
        top_score = np.take_along_axis(acc, top, axis=1)
        parent, token = top // vocab, top % vocab
        cand_seq = run_seq[img, parent]
        cand_seq[:, :, cur] = token
        cand_lp = run_lp[img, parent]
        cand_lp[:, :, cur - p] = raw.reshape(n, k, vocab)[img, parent, token]
        hits = (token == eos) | (cur + 1 >= max_length)

        # Running beams: the best K candidates that did not just finish.
        masked = top_score + hits.astype(np.float32) * NEG
        keep = np.argsort(-masked, axis=1, kind="stable")[:, :k]
        beam_idx = (img * k + parent[img, keep]).reshape(-1)
        run_seq, run_lp, run_score = cand_seq[img, keep], cand_lp[img, keep], masked[img, keep]

        # Finished hypotheses: only candidates among the top K may enter, scored with the length penalty.
        new_score = top_score / np.float32((cur + 1 - p) ** length_penalty)
        if early_stopping is True:
            new_score = new_score + fin_done.all(axis=1, keepdims=True).astype(np.float32) * NEG
        new_score = new_score + (~improvable)[:, None].astype(np.float32) * NEG
        just = hits & top_mask[None, :]
        new_score = new_score + (~just).astype(np.float32) * NEG
        merged_score = np.concatenate([fin_score, new_score], axis=1)
        best = np.argsort(-merged_score, axis=1, kind="stable")[:, :k]
        fin_seq = np.concatenate([fin_seq, cand_seq], axis=1)[img, best]
        fin_lp = np.concatenate([fin_lp, cand_lp], axis=1)[img, best]
        fin_len = np.concatenate([fin_len, np.full((n, k2), cur + 1 - p)], axis=1)[img, best]
        fin_done = np.concatenate([fin_done, just], axis=1)[img, best]
        fin_score = merged_score[img, best]
        cur += 1

        # HF's heuristic: can the best running beam still beat the worst finished one?
        hyp = (max_length if early_stopping == "never" and length_penalty > 0 else cur) - p
        best_running = run_score[:, :1] / np.float32(hyp**length_penalty)
        worst_finished = np.where(fin_done, fin_score.min(axis=1, keepdims=True), NEG)
        improvable &= (best_running > worst_finished).any(axis=1)
        open_beams = not (fin_done.all() and early_stopping is True)
        if not (improvable.any() and open_beams and not hits.all()):
            break
        logits = step(run_seq[:, :, cur - 1].reshape(n * k, 1), beam_idx)
    return _summarise(p, fin_seq[:, 0], fin_lp[:, 0], fin_len[:, 0], eos)
