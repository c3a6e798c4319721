"""The library's captioning policy (reefcap.models.policy.captioning) on real tiny BLIP engines: the object the server,
`reefcap caption` and `reefcap eval` share."""

from __future__ import annotations

import time
from collections import Counter

import pytest
from server_helpers import collapsed_model, unchecked_engine_class

from reefcap.models.engines.base import DecodeOptions, EngineConfig
from reefcap.models.engines.torch_engine import TorchCaptionEngine
from reefcap.models.errors import ModelLoadError, ReefcapError
from reefcap.models.factory import TinyConfig, init_tiny
from reefcap.models.metrics import degenerate_reason
from reefcap.models.policy import CaptionPolicy, CircuitBreaker, PolicyObserver, as_policy, fallback_name

CPU = EngineConfig(device="cpu")
GREEDY = DecodeOptions.greedy()


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Recorder(PolicyObserver):
    def __init__(self) -> None:
        self.fallbacks: Counter[str] = Counter()
        self.roles: list[str] = []
        self.timings: list[tuple[str, float, float]] = []  # (role, seconds, perf_counter when reported)
        self.breaker_states: list[bool] = []

    def fallback(self, reason, images):
        self.fallbacks[reason] += images

    def inference(self, role, info, seconds):
        self.roles.append(role)
        self.timings.append((role, seconds, time.perf_counter()))

    def assert_timed_in_order(self, since: float) -> None:
        """Every span reported after ``since`` took time and fits, end to end, between ``since`` and when it
        was reported: wrong units, another clock or a cumulative count would not fit."""
        previous = since
        for role, seconds, told in self.timings:
            if told < since:
                continue
            assert seconds > 0, role
            assert told - seconds >= previous, (role, seconds, told - previous)  # began after the last one ended
            previous = told

    def breaker(self, is_open):
        self.breaker_states.append(is_open)


SHORT = TinyConfig(max_positions=16)


@pytest.fixture(scope="module")
def engines(varied_model, tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("policy-models")
    return {
        "varied": TorchCaptionEngine.load(str(varied_model), CPU),
        "tiny": TorchCaptionEngine.load(str(tiny_model), CPU),
        "collapsed": TorchCaptionEngine.load(str(collapsed_model(tiny_model, root / "collapsed")), CPU),
        # 16 positions, unchecked: greedy decoding to max_length 20 makes every generate call raise IndexError
        "short": unchecked_engine_class().load(str(init_tiny(root / "short", config=SHORT)), CPU),
    }


def test_breaker_opens_after_n_failures_then_allows_one_trial():
    clock = Clock()
    b = CircuitBreaker(failures=3, reset_s=10, clock=clock)
    b.record_failure()
    b.record_failure()
    b.record_success()  # a success in between: the count starts again
    b.record_failure()
    b.record_failure()
    assert not b.is_open
    b.record_failure()
    assert b.is_open
    clock.now += 9.9
    assert b.is_open
    clock.now += 0.2
    assert not b.is_open  # half-open: the next batch may try the primary
    b.record_failure()  # the trial failed: open again at once, not after 3 more
    assert b.is_open
    clock.now += 10.1
    b.record_success()  # the trial succeeded: closed, and a later single failure does not reopen
    b.record_failure()
    assert not b.is_open
    with pytest.raises(ReefcapError):
        CircuitBreaker(failures=0)


def test_failing_primary_goes_to_fallback_and_opens_the_circuit(engines, euvp_images):
    clock, seen = Clock(), Recorder()
    breaker = CircuitBreaker(failures=2, reset_s=30, clock=clock)
    policy = CaptionPolicy(engines["short"], engines["tiny"], breaker=breaker, observer=seen)
    images = [policy.decode(p) for p in euvp_images[:2]]
    expected = [c.caption for c in engines["tiny"].caption(images, GREEDY)]

    reasons = []
    since = time.perf_counter()
    for step in range(5):
        if step == 3:
            clock.now += 31  # past reset_s: one batch tries the primary again, fails, reopens
        served = policy.caption(images, GREEDY)
        assert [s.caption for s in served] == expected
        assert all(s.model.name == engines["tiny"].describe().name for s in served)
        reasons.append(served[0].fallback_reason)
        assert served[1].fallback == {"used": True, "reason": reasons[-1]}
    assert reasons == ["primary_error", "primary_error", "circuit_open", "primary_error", "circuit_open"]
    assert policy.counts == Counter({"primary_error": 6, "circuit_open": 4}) == seen.fallbacks
    assert seen.breaker_states == [False, True, True]  # told after each primary attempt
    assert seen.roles.count("fallback") == 5 and "primary" not in seen.roles  # a failed batch is not timed
    seen.assert_timed_in_order(since)

    policy.swap_primary(engines["varied"])  # a new primary closes the circuit
    assert not policy.circuit_open
    since = time.perf_counter()
    served = policy.caption(images, GREEDY)
    assert seen.roles[5] == "primary"
    seen.assert_timed_in_order(since)
    own = engines["varied"].caption(images, GREEDY)
    for s, c in zip(served, own, strict=True):  # the primary answers, save where its caption is degenerate
        reason = degenerate_reason(c.caption)
        assert s.fallback_reason == (f"degenerate_{reason}" if reason else None)
        assert s.caption == c.caption or reason
    assert served[0].fallback_reason is None


def test_degenerate_captions_are_replaced_per_image(engines, euvp_images):
    policy = CaptionPolicy(engines["collapsed"], engines["varied"])
    images = [policy.decode(p) for p in euvp_images[:3]]
    assert "coral coral coral" in engines["collapsed"].caption(images[:1], GREEDY)[0].caption
    served = policy.caption(images, GREEDY)
    assert [s.fallback_reason for s in served] == ["degenerate_repetition"] * 3
    assert [s.caption for s in served] == [c.caption for c in engines["varied"].caption(images, GREEDY)]
    assert policy.counts == Counter({"degenerate_repetition": 3})
    # Without a fallback the primary's caption stands, however degenerate.
    alone = CaptionPolicy(engines["collapsed"]).caption(images[:1], GREEDY)
    assert alone[0].fallback_reason is None and "coral coral" in alone[0].caption


def test_unavailable_primary_timeout_and_no_fallback(engines, euvp_images):
    image = engines["tiny"].decode(euvp_images[0])
    served = CaptionPolicy(None, engines["tiny"]).caption([image], GREEDY)
    assert served[0].fallback == {"used": True, "reason": "primary_unavailable"}

    slow = CaptionPolicy(engines["varied"], engines["tiny"], primary_timeout_s=0.001)
    assert slow.caption([image], GREEDY)[0].fallback_reason == "primary_timeout"
    slow.close()

    with pytest.raises(ModelLoadError, match="primary_error: .*no fallback") as info:
        as_policy(engines["short"]).caption([image], GREEDY)
    assert isinstance(info.value.__cause__, IndexError)  # the engine's own error is kept
    with pytest.raises(ModelLoadError, match="no model is loaded"):
        CaptionPolicy(None, None).decode(euvp_images[0])


def test_fallback_name():
    assert fallback_name("none") is None and fallback_name("None") is None and fallback_name("") is None
    assert fallback_name("reefscenes-tiny") == "reefscenes-tiny"
