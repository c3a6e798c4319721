"""Issue 24: the caption service as a Ray Serve deployment on a real local Ray cluster (one for the module, its
object store capped), beside a plain `reefcap serve` on the same PostgreSQL feedback store.

The deployment answers the same requests with the same result shape and the same captions as the plain server,
keeps its API key, takes feedback for what either served (and the plain server for what it served), and exports
its metrics through Ray's metrics agent with the deployment's tags.
"""

from __future__ import annotations

import socket

import httpx
import pytest
from pg_helpers import wait_for
from server_helpers import LiveServer, png_bytes

pytestmark = [pytest.mark.heavy, pytest.mark.slow]  # a Ray cluster, two replicas and a server: 40-60 s on 2 vCPUs
ray = pytest.importorskip("ray")
KEY = "ray-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def dsn(postgres):
    return postgres.fresh_database("ray_serve")


@pytest.fixture(scope="module")
def plain(tiny_model, dsn, tmp_path_factory):
    srv = LiveServer.torch_cpu(tmp_path_factory.mktemp("plain"), tiny_model, "", api_key=KEY, feedback_dsn=dsn)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def deployed(tiny_model, dsn, plain):
    from ray import serve

    from reefcap.server.ray_serve import APP_NAME, build_application
    from reefcap.server.settings import ServerSettings

    http_port, metrics_port = _free_port(), _free_port()
    ray.init(
        num_cpus=2,
        object_store_memory=80 << 20,  # Ray's default takes 30% of memory for a store these tests never use
        include_dashboard=False,
        log_to_driver=False,
        _metrics_export_port=metrics_port,
        _system_config={"metrics_report_interval_ms": 1000},  # metrics reach the agent each second, not each 10
    )
    settings = ServerSettings(
        _env_file=None,
        model=str(tiny_model),
        fallback=None,
        backend="torch",
        device="cpu",
        api_key=KEY,
        feedback_dsn=dsn,
        replicas=2,
        max_replicas=3,
    )
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": http_port})
        serve.run(build_application(settings), name=APP_NAME, route_prefix="/", blocking=False)
        yield f"http://127.0.0.1:{http_port}", f"http://127.0.0.1:{metrics_port}/metrics"
    finally:
        serve.shutdown()
        ray.shutdown()


def _caption(url: str, colors) -> httpx.Response:
    files = [("images", (f"{i}.png", png_bytes((64, 48), c), "image/png")) for i, c in enumerate(colors)]
    return httpx.post(url + "/v1/captions", files=files, headers=AUTH, timeout=120)


def _shape(value):
    """The keys of a JSON answer all the way down, values dropped."""
    if isinstance(value, dict):
        return {k: _shape(v) for k, v in value.items() if k not in ("latency_ms",)}
    if isinstance(value, list):
        return [_shape(v) for v in value]
    return type(value).__name__


def test_the_deployment_answers_as_the_plain_server_does(deployed, plain):
    url, _ = deployed
    colors = [(10, 80, 120), (200, 40, 30), (30, 160, 60)]
    ours, theirs = _caption(url, colors), _caption(plain.url, colors)
    assert ours.status_code == theirs.status_code == 200, (ours.text, theirs.text)
    assert _shape(ours.json()) == _shape(theirs.json())
    assert [r["caption"] for r in ours.json()["results"]] == [r["caption"] for r in theirs.json()["results"]]
    assert [r["model"] for r in ours.json()["results"]] == [r["model"] for r in theirs.json()["results"]]
    ready = httpx.get(url + "/readyz", timeout=30).json()
    assert ready["ready"] and ready["primary"]["version"] == theirs.json()["results"][0]["model"]["version"]
    refused = httpx.post(url + "/v1/captions", files=[("images", ("a.png", png_bytes()))], timeout=30)
    assert refused.status_code == 401 and refused.json()["error"]["code"] == "unauthorized"


def test_feedback_lands_in_the_one_postgres_store_whichever_served(deployed, plain, dsn, tmp_path):
    from reefcap.server.feedback import FeedbackStore

    url, _ = deployed
    served = {"ray": _caption(url, [(1, 2, 3)]), "plain": _caption(plain.url, [(4, 5, 6)])}
    posts = []
    for where, answer in served.items():
        rid = answer.json()["request_id"]
        for target in (url, plain.url):  # each side takes feedback for what the other served
            body = {"request_id": rid, "references": [f"served by {where}, posted to {target[-5:]}"]}
            posts.append(httpx.post(target + "/v1/feedback", json=body, headers=AUTH, timeout=60))
    assert [p.status_code for p in posts] == [200] * 4, [p.text for p in posts]
    store = FeedbackStore(dsn)
    try:
        exported = store.export(tmp_path / "export")
    finally:
        store.close()
    assert exported["images"] == 2 and exported["annotations"] == 4


def test_metrics_are_exported_through_rays_agent(deployed):
    url, agent = deployed
    assert _caption(url, [(7, 8, 9)] * 4).status_code == 200

    def images() -> float:
        text = httpx.get(agent, timeout=10).text
        lines = [ln for ln in text.splitlines() if ln.startswith("ray_reefcap_images_captioned")]
        return sum(float(ln.rsplit(" ", 1)[1]) for ln in lines if 'deployment="reefcap"' in ln)

    assert wait_for(lambda: images() >= 4, 30), "reefcap's metrics never reached Ray's metrics agent"


def test_deployment_options_scale_on_ongoing_requests():
    from reefcap.server.ray_serve import deployment_options
    from reefcap.server.settings import ServerSettings

    options = deployment_options(ServerSettings(_env_file=None, replicas=2, max_replicas=6))
    scaling = options["autoscaling_config"]
    assert (scaling["min_replicas"], scaling["max_replicas"], scaling["target_ongoing_requests"]) == (2, 6, 16)
    assert options["max_ongoing_requests"] >= 16  # below a batch, a replica's batches could never fill
