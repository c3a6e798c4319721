"""Ray Data scale-out gives the same greedy captions as the local engine (a real local 2-CPU Ray instance)."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.heavy  # starts a local Ray instance
pytest.importorskip("ray", reason="the ray extra is not installed")

from reefcap.clients.batch import BatchCaptioner  # noqa: E402
from reefcap.clients.ray_runner import run_on_ray  # noqa: E402
from reefcap.models.engines.base import DecodeOptions, EngineConfig  # noqa: E402
from reefcap.models.engines.torch_engine import TorchCaptionEngine  # noqa: E402


def test_ray_matches_local_greedy(varied_model, euvp_images, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_text("no")
    names = [str(p) for p in euvp_images[:6]] + [str(bad)]
    options = DecodeOptions.greedy()
    local_engine = TorchCaptionEngine.load(str(varied_model), EngineConfig(device="cpu"))
    local = list(BatchCaptioner(local_engine, 3, options, quality=True).run(names))

    remote = [
        r
        for batch in run_on_ray(names, str(varied_model), batch_size=3, options=options, num_cpus=2, quality=True)
        for r in batch
    ]
    assert sorted(r["image"] for r in remote) == sorted(names), "every input exactly once"
    by_name = {r["image"]: r for r in remote}
    for r in local:
        other = by_name[r["image"]]
        assert other.get("caption") == r.get("caption") and other.get("code") == r.get("code")
        assert other.get("quality") == r.get("quality") and ("quality" in r) == ("caption" in r)  # --quality
    assert len({r["caption"] for r in local if "caption" in r}) >= 2
