"""Per-image routing in the captioning policy: the router (features, threshold rule, file), how a batch is split
between the adapted model and the in-air model, the fallback rules per part, and the route every result names.

The policy tests use small fake engines whose caption names the model and the image's colour, so a swapped
order or a wrong model shows; the router is a real :class:`Router` deciding on the blue-minus-red cast."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest
from PIL import Image

from reefcap.models.engines.base import Caption, CaptionEngine, EngineInfo
from reefcap.models.errors import ReefcapError
from reefcap.models.policy import CaptionPolicy, CaptionResult
from reefcap.models.policy.routing import FEATURES, ROUTER_FILE, Router, feature_matrix, find_router, thumbnail
from reefcap.training.router import AIR_WEIGHT, choose_threshold, logistic_fit

BLUE, GREEN, RED, GREY = (20, 60, 160), (30, 140, 110), (170, 60, 40), (128, 128, 128)
NAMES = {BLUE: "blue", GREEN: "green", RED: "red", GREY: "grey"}


class Fake(CaptionEngine):
    """Captions ``"<name> <colour>"``; records each batch's size; raises when ``fail`` is set."""

    def __init__(self, name: str, fail: bool = False, water: bool = False) -> None:
        self.name, self.fail, self.water, self.batches = name, fail, water, []

    @classmethod
    def load(cls, model, config=None):
        return cls(model)

    def preprocess(self, images):
        return [tuple(int(v) for v in im.getpixel((0, 0))) for im in images]

    def generate(self, batch, options):
        self.batches.append(len(batch))
        if self.fail:
            raise RuntimeError(f"{self.name} is broken")
        water = {"label": "coastal", "probability": 0.9} if self.water else None
        return [Caption(f"{self.name} {NAMES.get(c, 'other')} scene", self.name, -0.5, 3, water) for c in batch]

    def describe(self):
        return EngineInfo(self.name, "v1", "fake", "cpu", "fp32", f"/nowhere/{self.name}")


def cast_router(threshold: float = 0.6) -> Router:
    """A router on one feature, blue minus red: water's cast. Blue and green images go underwater."""
    weights = [0.0] * len(FEATURES)
    weights[FEATURES.index("b_minus_r")] = 8.0
    ones = (1.0,) * len(FEATURES)
    return Router((0.0,) * len(FEATURES), ones, tuple(weights), 0.0, threshold, {"note": "test"})


def img(colour) -> Image.Image:
    return Image.new("RGB", (40, 30), colour)


def policy(primary=None, fallback=None, router=None, **kw) -> CaptionPolicy:
    return CaptionPolicy(primary, fallback, router=router or cast_router(), **kw)


def test_a_batch_is_split_by_route_each_part_batched_answers_in_order():
    wet, dry = Fake("adapted", water=True), Fake("pretrained")
    images = [img(c) for c in (BLUE, RED, GREEN, GREY, BLUE)]
    served = policy(wet, dry).caption(images)
    assert [s.caption for s in served] == [
        "adapted blue scene",
        "pretrained red scene",
        "adapted green scene",
        "pretrained grey scene",
        "adapted blue scene",
    ]
    assert wet.batches == [3] and dry.batches == [2]  # one batch per part
    assert [s.route.domain for s in served] == ["underwater", "in_air", "underwater", "in_air", "underwater"]
    assert [s.route.model for s in served] == [s.model.name for s in served]
    assert all(s.fallback_reason is None for s in served)  # the in-air model is the route, not a fallback
    first = served[0].to_dict()["route"]
    assert first["water_type"] == "coastal" and 0.6 <= first["probability"] <= 1  # the experts' estimate rides along
    assert "water_type" not in served[1].to_dict()["route"] and served[1].route.probability < 0.6


def test_the_fallback_rules_hold_for_the_underwater_part():
    wet, dry = Fake("adapted", fail=True), Fake("pretrained")
    p = policy(wet, dry)
    served = p.caption([img(BLUE), img(RED)])
    assert [(s.caption, s.fallback_reason) for s in served] == [
        ("pretrained blue scene", "primary_error"),
        ("pretrained red scene", None),
    ]
    assert served[0].route.domain == "underwater" and served[0].route.model == "pretrained"
    assert p.counts == {"primary_error": 1}  # only the underwater part failed over
    # An all-in-air batch never touches the primary: no failure counts against it.
    p.caption([img(RED), img(GREY)])
    assert wet.batches == [1] and p.breaker._count == 1


def test_the_primary_answers_in_air_images_when_the_in_air_model_fails():
    wet, dry = Fake("adapted"), Fake("pretrained", fail=True)
    served = policy(wet, dry).caption([img(RED), img(BLUE)])
    assert [s.caption for s in served] == ["adapted red scene", "adapted blue scene"]
    assert served[0].route.domain == "in_air" and served[0].route.model == "adapted"


def test_async_driver_routes_alike():
    wet, dry = Fake("adapted"), Fake("pretrained")
    images = [img(c) for c in (RED, BLUE, GREY)]
    served = asyncio.run(policy(wet, dry, primary_timeout_s=5).caption_async(images, timeout_s=5))
    assert [s.caption for s in served] == ["pretrained red scene", "adapted blue scene", "pretrained grey scene"]
    assert [s.to_dict()["route"]["domain"] for s in served] == ["in_air", "underwater", "in_air"]


def test_without_router_or_in_air_model():
    wet, dry = Fake("adapted"), Fake("pretrained")
    served = CaptionPolicy(wet, dry, router=None).caption([img(RED), img(BLUE)])
    assert [s.caption for s in served] == ["adapted red scene", "adapted blue scene"]
    assert all(s.route is None and s.to_dict()["route"] is None for s in served)
    # A router but nothing to send in-air images to: the primary answers all, and each route still says the domain.
    served = policy(Fake("adapted")).caption([img(RED), img(BLUE)])
    assert [s.route.domain for s in served] == ["in_air", "underwater"]
    assert {s.route.model for s in served} == {"adapted"}


def test_the_route_survives_the_json_form():
    served = policy(Fake("adapted", water=True), Fake("pretrained")).caption([img(BLUE), img(RED)])
    for s in served:
        back = CaptionResult.from_dict(json.loads(json.dumps(s.to_dict())))
        assert back.route == s.route


def test_router_file_round_trip_and_refusals(tmp_path):
    r = cast_router(0.7)
    r.save(tmp_path)
    again = Router.load(tmp_path)
    x = feature_matrix([img(BLUE), img(RED)])
    assert np.allclose(again.probabilities(x), r.probabilities(x)) and again.threshold == 0.7
    data = json.loads((tmp_path / ROUTER_FILE).read_text())
    for broken, message in (
        ({**data, "format": "other"}, "not a reefcap-router-2"),
        ({**data, "features": data["features"][::-1]}, "other features"),
        ({**data, "threshold": 0.3}, "threshold must be in [0.5, 1)"),
        ({**data, "weights": [1.0]}, "features"),
    ):
        (tmp_path / ROUTER_FILE).write_text(json.dumps(broken))
        with pytest.raises(ReefcapError, match=message.replace("[", r"\[").replace(")", r"\)")):
            Router.load(tmp_path)
    # A damaged router on a loaded model is logged and the model answers unrouted, never a failed start.
    engine = Fake("adapted")
    engine.checkpoint = tmp_path
    (tmp_path / ROUTER_FILE).write_text("{not json")
    assert find_router(engine) is None
    r.save(tmp_path)
    assert find_router(engine) == r


def test_thumbnail_of_a_large_photo_is_cheap_and_the_same_cast():
    small, large = img(GREEN), Image.new("RGB", (4000, 3000), GREEN)
    assert np.allclose(thumbnail(small), thumbnail(large), atol=1 / 255)


def test_threshold_rule_leans_to_the_in_air_model():
    # Separable: the middle (log-odds) of [0.5, lowest underwater probability] routes every image right.
    out = choose_threshold(np.array([0.9, 0.95, 0.99]), np.array([0.1, 0.3, 0.45]))
    assert out["range"] == [0.5, 0.9] and out["threshold"] == pytest.approx(0.75, abs=1e-3)
    # Overlap: an in-air image at 0.8 and an underwater one at 0.7. Counting errors alike, a cut below 0.7 costs
    # one in-air error (1/3) and one above 0.8 one underwater error (1/3): a tie. In-air errors weigh 3x, so the
    # rule cuts above the in-air image and gives up the underwater one.
    wet, dry = np.array([0.7, 0.95, 0.99]), np.array([0.1, 0.2, 0.8])
    assert choose_threshold(wet, dry, air_weight=AIR_WEIGHT)["threshold"] > 0.8
    assert choose_threshold(wet, dry, air_weight=1.0)["threshold"] <= 0.7
    with pytest.raises(ReefcapError, match="underwater and in-air validation"):
        choose_threshold(np.array([]), dry)


def test_logistic_fit_separates_and_is_deterministic():
    rng = np.random.default_rng(0)
    x = np.vstack([rng.normal(-1, 0.5, (50, 3)), rng.normal(1, 0.5, (50, 3))])
    y = np.r_[np.zeros(50), np.ones(50)]
    w, b = logistic_fit(x, y)
    assert ((x @ w + b > 0) == y).mean() > 0.97
    w2, b2 = logistic_fit(x, y)
    assert np.array_equal(w, w2) and b == b2


def test_a_router_is_found_beside_the_weights_loaded_even_through_a_shared_export(tiny_model, tmp_path):
    """Two folders with the same weights share one ONNX export (keyed by the weights), whose manifest names the
    folder it was made from; the router must come from the folder that was asked for."""
    import shutil

    from reefcap.models.engines.loader import load_engine

    plain, routed = tmp_path / "plain", tmp_path / "routed"
    shutil.copytree(tiny_model, plain)
    shutil.copytree(tiny_model, routed)
    cast_router().save(routed)
    first = load_engine(str(plain), backend="onnx")
    second = load_engine(str(routed), backend="onnx")
    assert first.describe().source == second.describe().source  # one export for both
    assert find_router(first) is None and find_router(second) == cast_router()
    assert CaptionPolicy(second, first).router == cast_router()
