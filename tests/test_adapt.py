"""`reefcap adapt`'s decisions on their own: where validation data comes from, which protocol wins under the
forgetting budget, the learning-rate rule, and its usage errors (the whole command runs in
tests/test_retraining_loop.py)."""

from __future__ import annotations

import json

import pytest

from reefcap.cli import main
from reefcap.models.data.datasets import load_dataset
from reefcap.training.adapt import AdaptConfig, choose, default_lr_scale, resolve_data


def _candidate(name: str, val: float, air: float) -> dict:
    return {"protocol": name, "manifest": {"metrics": {"val": {"CIDEr": val}, "in-air": {"CIDEr": air}}}}


def test_best_validation_cider_within_the_forgetting_budget():
    runs = [_candidate("damf", 0.60, 0.70), _candidate("damf_preserve", 0.55, 0.92), _candidate("naive", 0.50, 0.99)]
    best, why = choose(runs, base_air=1.0, budget=0.10)
    assert best["protocol"] == "damf_preserve" and "within the forgetting budget 0.1" in why
    assert [r["forgetting"] for r in runs] == [0.3, 0.08, 0.01]
    best, why = choose(runs[:1], base_air=1.0, budget=0.10)  # one protocol: nothing to choose between
    assert best["protocol"] == "damf"
    best, why = choose([_candidate("a", 0.6, 0.5), _candidate("b", 0.4, 0.8)], base_air=1.0, budget=0.10)
    assert best["protocol"] == "b" and "forgets least" in why and "20.0%" in why


def test_validation_split_from_the_data_when_none_is_given(synthetic, tmp_path):
    config = AdaptConfig(data=str(synthetic), out=str(tmp_path / "m"))
    train, val = resolve_data(config, tmp_path / "work")
    train_ids = {r.metadata.get("source_id", r.image_id) for r in load_dataset(train)}
    val_records = load_dataset(val)
    assert len(train_ids) + len(val_records) == 16 and 1 <= len(val_records) <= 5
    assert not train_ids & {r.metadata.get("source_id", r.image_id) for r in val_records}
    assert resolve_data(config, tmp_path / "again") == (
        str(tmp_path / "again" / "data" / "train.json"),
        str(tmp_path / "again" / "data" / "val.json"),
    )
    assert (tmp_path / "again" / "data" / "val.json").read_text() == (
        tmp_path / "work" / "data" / "val.json"
    ).read_text()


def test_a_feedback_export_folder_brings_its_own_validation_split(synthetic, tmp_path):
    folder = tmp_path / "export"
    folder.mkdir()
    doc = json.loads(synthetic.read_text())
    for img in doc["images"]:
        img["file_name"] = str(synthetic.parent / img["file_name"])
    (folder / "train.json").write_text(json.dumps(doc))
    (folder / "val.json").write_text(json.dumps({"images": [], "annotations": []}))  # empty: cut one instead
    train, val = resolve_data(AdaptConfig(data=str(folder), out=str(tmp_path / "m")), tmp_path / "w1")
    assert val == str(tmp_path / "w1" / "data" / "val.json")
    (folder / "val.json").write_text(json.dumps(doc))
    train, val = resolve_data(AdaptConfig(data=str(folder), out=str(tmp_path / "m")), tmp_path / "w2")
    assert (train, val) == (str(folder / "train.json"), str(folder / "val.json"))


def test_lr_scale_rule(tmp_path):
    assert default_lr_scale("reefscenes-tiny") == 10.0  # 8 MB of weights: the tiny BLIPs' lrs
    big = tmp_path / "big"
    big.mkdir()
    (big / "config.json").write_text("{}")
    with (big / "model.safetensors").open("wb") as fh:
        fh.truncate(41 << 20)  # sparse: a BLIP-base-sized file without writing it
    assert default_lr_scale(str(big)) == 1.0


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--protocols", "damf,damf_preserve"], "--air-val"),
        (["--base", "no-such-model"], "no-such-model"),
        (["--forgetting-budget", "1.5"], "--forgetting-budget"),
    ],
)
def test_usage_errors_are_one_line_before_training(synthetic, tmp_path, capsys, extra, message):
    assert main(["adapt", "--data", str(synthetic), "--out", str(tmp_path / "m"), *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    assert not (tmp_path / "m").exists() and not (tmp_path / "m-run").exists()
