"""Greedy decoding's row compaction: finished rows leave the decoder, the tokens stay those of the full batch."""

from __future__ import annotations

import numpy as np

from reefcap.models.engines.decoding import greedy

VOCAB, EOS, PAD = 12, 2, 0


def _decoder(lengths: list[int]):
    """A row-independent fake decoder step: row r emits tokens 3, 4, 5, ... and EOS after ``lengths[r]`` tokens.

    It keeps its own per-row state the way the ONNX engine keeps the KV cache: ``beam_idx`` picks the rows that
    continue. Returns the step and the list of row counts it was called with."""
    state = {"rows": np.arange(len(lengths)), "made": np.zeros(len(lengths), dtype=int)}
    calls: list[int] = []

    def step(tokens: np.ndarray, beam_idx: np.ndarray) -> np.ndarray:
        state["rows"], state["made"] = state["rows"][beam_idx], state["made"][beam_idx]
        calls.append(len(beam_idx))
        logits = np.zeros((len(beam_idx), VOCAB), dtype=np.float32)
        for i, (row, made) in enumerate(zip(state["rows"], state["made"], strict=True)):
            logits[i, EOS if made >= lengths[row] else 3 + made % 8] = 5.0
        state["made"] = state["made"] + 1
        return logits

    return step, calls


def test_compaction_gives_the_full_batch_tokens_and_runs_fewer_rows():
    lengths = [1, 6, 3, 9, 2]
    common = dict(max_length=16, min_length=1, repetition_penalty=1.0, eos=EOS, pad=PAD)
    full_step, full_calls = _decoder(lengths)
    full = greedy(full_step, [1, 7], len(lengths), **common)
    step, calls = _decoder(lengths)
    compact = greedy(step, [1, 7], len(lengths), compact=True, **common)
    assert compact.sequences == full.sequences
    assert compact.confidences == full.confidences and compact.lengths == full.lengths
    assert [len(s) - 2 for s in full.sequences] == [n + 1 for n in lengths]  # the tokens, then EOS
    assert full_calls == [5] * len(full_calls)
    assert calls[0] == 5 and calls[-1] == 1 and calls == sorted(calls, reverse=True)
    assert sum(calls) < sum(full_calls)


def test_compaction_with_repetition_penalty_and_min_length():
    lengths = [4, 1, 7]
    common = dict(max_length=12, min_length=4, repetition_penalty=1.3, eos=EOS, pad=PAD)
    a = greedy(_decoder(lengths)[0], [1], 3, **common)
    b = greedy(_decoder(lengths)[0], [1], 3, compact=True, **common)
    assert a == b
