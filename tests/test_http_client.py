"""Client retry and parsing logic against scripted answers (the real-server round trips are in test_client_server)."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from reefcap.clients.http import AsyncReefcapClient, ReefcapClient, ReefcapHTTPError, RetryPolicy

OK = {
    "request_id": "r1",
    "results": [
        {
            "index": 0,
            "caption": "a turtle over the reef",
            "model": {"name": "reefscenes-tiny-damf", "version": "abc", "backend": "torch"},
            "fallback": {"used": False, "reason": None},
            "confidence": -0.5,
            "tokens": 6,
            "latency_ms": 12.5,
            "quality": {"uiqm": 1.2, "uciqe": 0.5},
        }
    ],
}


class Script:
    """Answers requests in order from a list of (status, body, headers); records what it was sent."""

    def __init__(self, answers):
        self.answers, self.requests, self.times = list(answers), [], []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        import time

        self.requests.append(request)
        self.times.append(time.monotonic())
        status, body, headers = self.answers.pop(0)
        return httpx.Response(status, json=body, headers=headers)


def test_retries_503_honouring_retry_after_then_parses(euvp_images):
    script = Script(
        [
            (503, {"error": {"code": "overloaded", "message": "queue full"}}, {"Retry-After": "0.3"}),
            (200, OK, {"x-request-id": "r1"}),
        ]
    )
    client = ReefcapClient("http://reefcap.test", api_key="k", transport=httpx.MockTransport(script))
    result = client.caption(euvp_images[0], {"num_beams": 1})
    assert result.caption == "a turtle over the reef" and result.model.name == "reefscenes-tiny-damf"
    assert result.quality["uiqm"] == 1.2 and not result.fallback["used"] and result.request_id == "r1"
    assert len(script.requests) == 2 and script.times[1] - script.times[0] >= 0.29
    sent = script.requests[1]
    assert sent.headers["authorization"] == "Bearer k"
    assert b'name="images"' in sent.content and b'"num_beams": 1' in sent.content


def test_4xx_is_raised_with_server_code_and_not_retried():
    script = Script([(400, {"error": {"code": "not_an_image", "message": "not a recognised image format"}}, {})])
    client = ReefcapClient("http://reefcap.test", transport=httpx.MockTransport(script))
    with pytest.raises(ReefcapHTTPError) as info:
        client.caption(b"hello")
    assert info.value.status == 400 and info.value.code == "not_an_image" and len(script.requests) == 1


def test_gives_up_after_the_retry_budget():
    busy = (429, {"error": {"code": "rate_limited", "message": "slow down"}}, {"Retry-After": "0"})
    script = Script([busy] * 3)
    client = ReefcapClient("http://x", transport=httpx.MockTransport(script), retry=RetryPolicy(retries=2))
    with pytest.raises(ReefcapHTTPError, match="429"):
        client.caption(b"img")
    assert len(script.requests) == 3


def test_async_client_bounds_concurrency():
    in_flight, peak = 0, 0

    async def handler(request: httpx.Request) -> httpx.Response:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        await asyncio.sleep(0.02)
        in_flight -= 1
        return httpx.Response(200, json=OK)

    async def main():
        async with AsyncReefcapClient("http://x", transport=httpx.MockTransport(handler)) as client:
            return await client.caption_many([b"a"] * 12, concurrency=3)

    results = asyncio.run(main())
    assert len(results) == 12 and peak == 3


def test_retry_after_http_date_and_backoff_growth():
    policy = RetryPolicy(backoff_s=0.1, max_backoff_s=5)
    response = httpx.Response(503, headers={"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"})
    assert policy.delay(0, response) == 0.0  # a date in the past: retry now
    assert 0.05 <= policy.delay(0, None) <= 0.1 and 0.4 <= policy.delay(3, None) <= 0.8


def test_connection_failures_are_retried_then_raised():
    calls = []

    def flaky(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        if len(calls) == 1:
            raise httpx.ConnectError("refused", request=request)
        return httpx.Response(200, json=OK)

    fast = RetryPolicy(retries=1, backoff_s=0.01)
    assert ReefcapClient("http://x", transport=httpx.MockTransport(flaky), retry=fast).caption(b"a").caption
    assert len(calls) == 2

    def down(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    with pytest.raises(httpx.ConnectError):
        ReefcapClient("http://x", transport=httpx.MockTransport(down), retry=fast).caption(b"a")


def test_server_mode_reports_a_missing_file_as_not_found(tmp_path):
    from reefcap.clients.http import run_on_server
    from reefcap.models.engines.base import DecodeOptions

    class NoServer:  # every input is missing, so nothing may be sent
        def caption_many(self, uploads, options, concurrency):
            assert uploads == []
            return []

    gone = str(tmp_path / "gone.jpg")
    (records,) = run_on_server(NoServer(), [gone], DecodeOptions.greedy(), batch_size=4, concurrency=1)
    assert records == [{"image": gone, "error": f"{gone}: no such file", "code": "not_found"}]
