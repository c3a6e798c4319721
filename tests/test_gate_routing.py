"""The quality gate judges primaries as they are served: routed, on underwater and in-air gate sets. A candidate that
forgot the surface is refused, unless the router saved with it sends in-air images around it."""

from __future__ import annotations

import io

from PIL import Image
from server_helpers import write_manifest
from test_routing import cast_router

from reefcap.models.engines.base import Caption, CaptionEngine, EngineInfo
from reefcap.models.policy.gate import GateConfig, run_gate, verify_manifest
from reefcap.models.policy.routing import ROUTER_FILE

WET = {(20, 60, 160): "blue", (30, 140, 110): "green", (10, 90, 150): "teal", (40, 40, 120): "navy"}
DRY = {(170, 60, 40): "red", (128, 128, 128): "grey", (200, 180, 40): "yellow", (150, 90, 60): "brown"}


class Painter(CaptionEngine):
    """Names the image's colour; ``forgot`` gives every in-air image the same murky caption (forgetting)."""

    def __init__(self, name: str, forgot: bool = False) -> None:
        self.name, self.forgot = name, forgot

    @classmethod
    def load(cls, model, config=None):
        return cls(model)

    def preprocess(self, images):
        return [tuple(int(v) for v in im.getpixel((0, 0))) for im in images]

    def generate(self, batch, options):
        out = []
        for c in batch:
            text = f"a {WET[c]} reef underwater" if c in WET else f"a {DRY[c]} beach on land"
            if self.forgot and c in DRY:
                text = "a murky reef in green water"
            out.append(Caption(text, self.name, -0.5, 5))
        return out

    def describe(self):
        return EngineInfo(self.name, "v1", "fake", "cpu", "fp32", f"/nowhere/{self.name}")


def items(colours: dict) -> list:
    out = []
    for colour, name in list(colours.items()) * 2:
        buf = io.BytesIO()
        Image.new("RGB", (32, 32), colour).save(buf, format="PNG")
        refs = [f"a {name} reef underwater"] if colours is WET else [f"a {name} beach on land"]
        out.append((buf.getvalue(), refs))
    return out


def folder(tmp_path, name: str, router: bool):
    path = tmp_path / name
    path.mkdir()
    (path / "config.json").write_text("{}")
    (path / "model.safetensors").write_bytes(b"weights of " + name.encode())
    if router:
        cast_router().save(path)
    write_manifest(path, {"name": name})
    return path


def judge(candidate, path, serving, in_air=None):
    return run_gate(
        candidate,
        path,
        serving,
        items(WET),
        "underwater set",
        config=GateConfig(),
        in_air=in_air,
        air_items=items(DRY),
        air_set="in-air set",
    )


def test_forgetting_is_refused_unless_routed_around(tmp_path):
    serving, pretrained = Painter("serving"), Painter("pretrained")
    serving.checkpoint = folder(tmp_path, "serving", router=True)
    for name, router in (("forgets", False), ("forgets-routed", True)):
        candidate = Painter(name, forgot=True)
        candidate.checkpoint = folder(tmp_path, name, router=router)
        report = judge(candidate, candidate.checkpoint, serving, in_air=pretrained)
        verdicts = {v.metric: v for v in report.verdicts}
        assert report.air_set == "in-air set" and report.routed == {"candidate": router, "serving": True}
        assert verdicts["CIDEr"].passed  # underwater it is as good as the serving model
        if router:
            assert report.accepted, report.reasons()
            assert verdicts["in_air/CIDEr"].candidate == verdicts["in_air/CIDEr"].serving
        else:
            assert not report.accepted
            assert any(r.startswith("in_air/CIDEr:") for r in report.reasons()), report.reasons()
    # Without an in-air model the gate is what it was: underwater only, nothing routed.
    report = judge(candidate, candidate.checkpoint, serving)
    assert report.accepted and report.air_set is None
    assert not any(v.metric.startswith("in_air/") for v in report.verdicts)


def test_a_router_added_after_the_manifest_is_refused(tmp_path):
    path = folder(tmp_path, "late", router=False)
    assert verify_manifest(path) == []
    cast_router().save(path)
    assert verify_manifest(path) == [f"manifest.json does not list {ROUTER_FILE}, which the folder holds"]
