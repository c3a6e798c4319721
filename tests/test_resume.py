"""`reefcap train --resume` against the run's saved setup (`reefcap_train.json`), and the training modules'
import graph (typed configs instead of an argparse Namespace passed between `compare` and `train_cli`)."""

from __future__ import annotations

import ast
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from synthetic_captions import all_captions, make_dataset

from reefcap.cli import main
from reefcap.training.config import TrainConfig, load_recipe, save_configs
from reefcap.training.runs import RunInputs, setup_differences

pytestmark = pytest.mark.timeout(240)
TRAINING = Path(__file__).resolve().parents[1] / "training"


@pytest.fixture(scope="module")
def captions(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("resume-syn"), n=12)


@pytest.fixture(scope="module")
def start(captions, tmp_path_factory) -> Path:
    from reefcap.models.factory import TinyConfig, init_tiny

    cfg = TinyConfig(image_size=32, vision_hidden=64, text_hidden=64, vision_layers=2, text_layers=2, vocab_size=300)
    return init_tiny(tmp_path_factory.mktemp("resume-m") / "m", all_captions(captions), cfg)


def _train(start: Path, data: Path, out: Path, *extra: str) -> int:
    # pretrain x 0.05 = 2 epochs of 6 steps (24 captions, batch 4), one warmup step, a checkpoint per epoch.
    args = ["train", "--recipe", "pretrain", "--epochs-scale", "0.05", "--model", str(start), "--data", str(data)]
    return main([*args, "--out", str(out), "--batch-size", "4", "--seed", "1", "--no-progress", *extra])


def _log(run: Path, kind: str = "train") -> list[dict]:
    return [e for e in map(json.loads, (run / "log.jsonl").read_text().splitlines()) if e["type"] == kind]


def _same_weights(a: Path, b: Path) -> bool:
    x, y = load_file(a / "last" / "model.safetensors"), load_file(b / "last" / "model.safetensors")
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def test_resume_with_the_same_options_is_exact(start, captions, tmp_path, capsys):
    assert _train(start, captions, tmp_path / "full") == 0
    assert _train(start, captions, tmp_path / "cut", "--max-steps", "5") == 0
    # --max-steps differs from the saved run's: it says when to stop, not what is learnt, so no refusal.
    assert _train(start, captions, tmp_path / "cut", "--resume") == 0
    assert "override" not in capsys.readouterr().err
    assert _same_weights(tmp_path / "full", tmp_path / "cut")
    full, cut = _log(tmp_path / "full"), _log(tmp_path / "cut")
    assert len(full) == 12 and [(e["loss"], e["lr"]) for e in full] == [(e["loss"], e["lr"]) for e in cut]
    saved = json.loads((tmp_path / "cut" / "last" / "reefcap_train.json").read_text())
    assert saved["inputs"]["data"] == str(captions.resolve()) and saved["train"]["max_steps"] is None


def test_resume_refuses_a_changed_setup_and_names_the_fields(start, captions, tmp_path, capsys):
    run = tmp_path / "run"
    assert _train(start, captions, run, "--max-steps", "5") == 0
    state = (run / "checkpoint" / "state.json").read_text()
    capsys.readouterr()
    other = make_dataset(tmp_path / "other", n=12)
    cases = {
        ("--lr-scale", "2"): "recipe.stages[0].lr (0.0005 -> 0.001)",
        ("--batch-size", "2"): "train.batch_size (4 -> 2)",
        ("--no-augment",): "train.augment.enabled (True -> False)",
        ("--data", str(other)): "inputs.data",
    }
    for extra, field in cases.items():
        assert _train(start, captions, run, "--resume", *extra) == 2, extra
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("reefcap: error: --resume:"), err
        assert field in err[0] and "--resume-override" in err[0], err
    assert (run / "checkpoint" / "state.json").read_text() == state and len(_log(run)) == 5


def test_resume_override_trains_on_with_the_new_values(start, captions, tmp_path, capsys):
    assert _train(start, captions, tmp_path / "fast", "--lr-scale", "2") == 0
    assert _train(start, captions, tmp_path / "cut", "--max-steps", "5") == 0
    capsys.readouterr()
    assert _train(start, captions, tmp_path / "cut", "--resume", "--lr-scale", "2", "--resume-override") == 0
    out, err = capsys.readouterr()
    assert "--resume-override: continuing" in err and "recipe.stages[0].lr" in err
    assert json.loads(out.strip().splitlines()[-1])["overridden"] == ["recipe.stages[0].lr"]
    fast, cut = (
        {e["step"]: e["lr"] for e in _log(tmp_path / "fast")},
        {e["step"]: e["lr"] for e in _log(tmp_path / "cut")},
    )
    assert cut[5] != fast[5]  # before the resume: the old lr
    assert all(cut[s] == fast[s] for s in range(6, 13)), (cut, fast)  # after it: the new lr on the same schedule
    (note,) = _log(tmp_path / "cut", "resume_override")
    assert note["step"] == 5 and note["changed"]["recipe.stages[0].lr"] == [0.0005, 0.001]
    saved = json.loads((tmp_path / "cut" / "last" / "reefcap_train.json").read_text())
    assert saved["recipe"]["stages"][0]["lr"] == 0.001


def test_setup_differences_ignore_labels_and_stopping(tmp_path):
    recipe, config = load_recipe("damf"), TrainConfig(batch_size=4)
    inputs = RunInputs(model="reefscenes-tiny", data=str(tmp_path))
    save_configs(tmp_path, recipe, config, {"inputs": inputs.identity()})
    saved = json.loads((tmp_path / "reefcap_train.json").read_text())
    relabelled = replace(
        recipe, name="copy", description="x", stages=tuple(replace(s, name="s") for s in recipe.stages)
    )
    quiet = replace(config, max_steps=3, checkpoint_every=7, grad_window=5)
    assert setup_differences(saved, relabelled, quiet, inputs) == {}
    shorter = replace(recipe, stages=recipe.stages[:1])
    changes = setup_differences(saved, shorter, replace(config, seed=2), replace(inputs, val="v.json"))
    assert changes["train.seed"] == (0, 2) and changes["inputs.val"] == (None, "v.json")
    assert changes["recipe.stages[1].lr"] == (recipe.stages[1].lr, None)


def _training_imports(path: Path) -> set[str]:
    """Modules of training/ that ``path`` imports anywhere, lazily inside functions included."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            names.update([node.module.split(".")[0]] if node.module else [a.name for a in node.names])
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("reefcap.training."):
            names.add(node.module.split(".")[2])
        elif isinstance(node, ast.Import):
            names.update(a.name.split(".")[2] for a in node.names if a.name.startswith("reefcap.training."))
    return names


def test_training_modules_import_each_other_without_cycles():
    graph = {p.stem: _training_imports(p) for p in TRAINING.glob("*.py")}
    assert "runs" in graph["compare"] and "compare" in graph["train_cli"]  # the edges this guards are real
    cycles = []

    def visit(module: str, path: list[str]) -> None:
        for dep in sorted(graph.get(module, ())):
            if dep in path:
                cycles.append(" -> ".join([*path[path.index(dep) :], dep]))
            elif dep in graph:
                visit(dep, [*path, dep])

    for module in graph:
        visit(module, [module])
    assert not cycles, cycles
