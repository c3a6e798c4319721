"""WiSE-FT merges (`reefcap merge`) and the comparison frontier's rules: which candidates sit on the Pareto front,
which one the stated rule ships, and whether it beats every single model on the mixed survey."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file
from test_cli import assert_usage_error, reefcap

from reefcap.models.engines.base import DecodeOptions
from reefcap.models.engines.loader import load_engine
from reefcap.models.errors import ReefcapError
from reefcap.models.registry import sha256_file
from reefcap.training.frontier_report import mixed_lines, pareto, select_default
from reefcap.training.merge import interpolate, merge_checkpoints


def test_interpolate_is_per_tensor_and_refuses_other_architectures():
    a = {"w": np.zeros((2, 2), np.float32), "ids": np.arange(3)}
    b = {"w": np.full((2, 2), 4.0, np.float32), "ids": np.arange(3) + 10}
    mixed = interpolate(a, b, 0.25)
    assert np.allclose(mixed["w"], 1.0) and mixed["w"].dtype == np.float32
    assert np.array_equal(mixed["ids"], b["ids"])  # integer buffers are not averaged
    with pytest.raises(ReefcapError, match="differ in architecture: w is"):
        interpolate(a, {**b, "w": np.zeros((3, 2), np.float32)}, 0.5)
    with pytest.raises(ReefcapError, match="'extra' is in one only"):
        interpolate(a, {**b, "extra": np.zeros(1, np.float32)}, 0.5)


def test_merge_writes_a_servable_checkpoint_between_its_parents(tiny_model, varied_model, tmp_path, euvp_images):
    out = tmp_path / "merged"
    manifest = merge_checkpoints(str(tiny_model), str(varied_model), 0.5, out)
    zero, one, half = (load_file(str(p / "model.safetensors")) for p in (tiny_model, varied_model, out))
    name = next(k for k, v in one.items() if v.ndim == 2 and not np.allclose(v, zero[k]))
    assert np.allclose(half[name], (zero[name] + one[name]) / 2, atol=1e-6)
    assert manifest["merge"]["alpha"] == 0.5 and manifest["merge"]["theta1"]["model"] == str(varied_model)
    assert manifest["files"]["model.safetensors"] == sha256_file(out / "model.safetensors")
    assert "reefcap_train.json" not in manifest["files"] and (out / "config.json").is_file()
    captions = load_engine(str(out), backend="torch").caption(euvp_images[:2], DecodeOptions.greedy())
    assert len(captions) == 2 and all(c.model == "merged" for c in captions)
    with pytest.raises(ReefcapError, match="exists; pass --force"):
        merge_checkpoints(str(tiny_model), str(varied_model), 0.5, out)
    # a = 0 is theta0 itself.
    merge_checkpoints(str(tiny_model), str(varied_model), 0.0, out, force=True)
    assert all(np.array_equal(v, zero[k]) for k, v in load_file(str(out / "model.safetensors")).items())


def test_merge_command_errors_are_one_line(tiny_model, tmp_path):
    assert_usage_error(
        reefcap("merge", str(tiny_model), str(tiny_model), "--alpha", "1.5", "--out", str(tmp_path / "m")),
        "--alpha must be in [0, 1]",
    )
    other = tmp_path / "other"
    shutil.copytree(tiny_model, other)
    weights = load_file(str(other / "model.safetensors"))
    weights.pop(sorted(weights)[0])
    save_file(weights, str(other / "model.safetensors"))
    result = reefcap("merge", str(tiny_model), str(other), "--alpha", "0.5", "--out", str(tmp_path / "m"))
    assert_usage_error(result, "differ in architecture")
    assert not (tmp_path / "m").exists()


def scores(wet: float, air: float, val_wet: float, val_air: float, mixed: float) -> list[dict]:
    return [
        {
            "underwater": {"CIDEr": wet},
            "in-air": {"CIDEr": air},
            "val-underwater": {"CIDEr": val_wet},
            "val-in-air": {"CIDEr": val_air},
            "mixed": {"CIDEr": mixed},
        }
    ]


def test_the_rule_picks_the_best_underwater_among_those_keeping_95_percent_in_air():
    results = {
        "start": scores(0.25, 0.80, 0.26, 0.82, 0.55),
        "naive": scores(0.68, 0.39, 0.66, 0.40, 0.50),  # best underwater, forgets the surface
        "merged naive a=0.5": scores(0.45, 0.70, 0.44, 0.72, 0.58),
        "routed naive": scores(0.67, 0.80, 0.65, 0.80, 0.74),  # 0.80 / 0.82 = 97.6% kept
        "routed damf": scores(0.70, 0.75, 0.70, 0.77, 0.72),  # more underwater, but 94% kept: not eligible
    }
    families = {"start": "start", "naive": "naive", "merged naive a=0.5": "merged"}
    families.update({"routed naive": "routed", "routed damf": "routed"})
    chosen, why = select_default(results, 0.95)
    assert chosen == "routed naive" and "0.650" in why and ">= 0.779" in why
    points = {n: (r[0]["in-air"]["CIDEr"], r[0]["underwater"]["CIDEr"]) for n, r in results.items()}
    assert pareto(points) == {"routed naive", "routed damf"}  # start: as good in air, worse underwater
    assert "beats every single model" in mixed_lines(results, families, chosen)[0]
    results["merged naive a=0.5"] = scores(0.45, 0.70, 0.44, 0.72, 0.80)
    assert "does NOT beat every single model" in mixed_lines(results, families, chosen)[0]
    assert select_default({"naive": results["naive"]}, 0.95)[0] is None  # no start: no bar to keep


def test_compare_refuses_frontier_options_it_cannot_act_on(tmp_path):
    data = tmp_path / "d.json"
    data.write_text(json.dumps({"images": [], "annotations": []}))
    common = ["compare", "--model", "reefscenes-tiny", "--data", str(data), "--test", str(data)]
    common += ["--work", str(tmp_path / "w"), "--report", str(tmp_path / "r.md"), "--recipes", "naive"]
    assert_usage_error(reefcap(*common, "--merge", "damf", "--merge-alphas", "0.5"), "--merge: 'damf'")
    assert_usage_error(reefcap(*common, "--merge", "naive"), "--merge needs --merge-alphas")
    assert_usage_error(reefcap(*common, "--merge-alphas", "0,1"), "each a must be in (0, 1)")
    assert_usage_error(reefcap(*common, "--route"), "--route fits a router")
    assert not (tmp_path / "w").exists()
