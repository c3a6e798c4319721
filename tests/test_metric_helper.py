"""The /metrics reader the server tests use: a misspelt metric or label must fail, never read as 0."""

from __future__ import annotations

import pytest
from prometheus_client import generate_latest
from server_helpers import metric, metric_or_zero

from reefcap.server.metrics import Metrics


@pytest.fixture
def text() -> str:
    m = Metrics()
    m.fallbacks.labels(reason="primary_error").inc(2)
    m.requests.labels(endpoint="/v1/captions", status="200").inc()
    return generate_latest(m.registry).decode()


def test_metric_sums_matching_series(text):
    assert metric(text, "reefcap_fallbacks_total", reason="primary_error") == 2
    assert metric(text, "reefcap_http_requests_total", status="200") == 1
    assert metric(text, "reefcap_batch_size_images_count") == 0  # an unlabelled histogram exists from the start


@pytest.mark.parametrize(
    ("name", "labels"),
    [
        ("reefcap_fallback_total", {}),  # misspelt name
        ("reefcap_fallbacks_total", {"reason": "primary_eror"}),  # misspelt label value
        ("reefcap_http_requests_total", {"status": "20"}),  # a prefix of a value is not the value
    ],
)
def test_metric_fails_on_a_missing_series(text, name, labels):
    with pytest.raises(AssertionError, match=name):
        metric(text, name, **labels)


def test_metric_or_zero_is_zero_only_for_a_declared_family(text):
    assert metric_or_zero(text, "reefcap_fallbacks_total", reason="circuit_open") == 0
    assert metric_or_zero(text, "reefcap_fallbacks_total", reason="primary_error") == 2
    with pytest.raises(AssertionError, match="not declared"):
        metric_or_zero(text, "reefcap_fallback_total", reason="circuit_open")
