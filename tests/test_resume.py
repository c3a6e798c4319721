"""`reefcap train --resume` against the run's saved setup (`reefcap_train.json`), and the training modules'
import graph (typed configs instead of an argparse Namespace passed between `compare` and `train_cli`)."""

from __future__ import annotations

import ast
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
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


# ---- GuiDG's water-type experts: the same Trainer, so the same exact resume ---------------------------------

EXPERTS_RECIPE = """\
base: base
experts:
  domains: {clear: [I], coastal: [1C]}
  context: 2
  heads: 2
  holdout: 0.4
  fusion_lr: 1.0e-2
  select_on_val: true
stages:
  - {name: experts, groups: [prompts], lr: 5.0e-2, epochs: 2, weight_decay: 0.0}
  - {name: fusion, groups: [vision, fusion], lr: 1.0e-3, epochs: 2, weight_decay: 0.1}
"""


def _with_water(coco: Path, seed: int) -> Path:
    """``coco`` with a Jerlov water type per image (alternating clear ocean I and coastal 1C)."""
    data = json.loads(coco.read_text())
    for i, img in enumerate(data["images"]):
        img["water_type"] = ("I", "1C")[(i + seed) % 2]
    coco.write_text(json.dumps(data))
    return coco


@pytest.fixture(scope="module")
def experts_setup(tmp_path_factory) -> dict[str, Path]:
    """Tiny data in two water domains, a validation split, a recipe, and a start model whose vision encoder has
    attention dropout: stage 2 trains it, so a resume that did not restore the RNG would differ."""
    from reefcap.models.factory import TinyConfig, init_tiny

    root = tmp_path_factory.mktemp("experts-resume")
    data = _with_water(make_dataset(root / "train", n=16), 0)
    val = _with_water(make_dataset(root / "val", n=4, seed=1), 1)
    # The clear-water images' validation captions are word salad that training moves away from: that expert's
    # validation loss rises, so stage 1's selection keeps its first validated state (the other expert's last).
    coco = json.loads(val.read_text())
    clear = {img["id"] for img in coco["images"] if img["water_type"] == "I"}
    for a in coco["annotations"]:
        a["caption"] = "dark dark circle circle" if a["image_id"] in clear else a["caption"]
    val.write_text(json.dumps(coco))
    cfg = TinyConfig(image_size=32, vision_hidden=64, text_hidden=64, vision_layers=2, text_layers=2, vocab_size=300)
    start = init_tiny(root / "m", all_captions(data), cfg)
    config = json.loads((start / "config.json").read_text())
    config["vision_config"]["attention_dropout"] = 0.2
    (start / "config.json").write_text(json.dumps(config))
    # Larger weights than a fresh init's: the decoder then listens to the experts' context, so their validation
    # losses move, and stage 1's per-expert selection keeps an earlier state for some expert.
    weights = load_file(start / "model.safetensors")
    gen = torch.Generator().manual_seed(1)
    noisy = {k: v + torch.randn(v.shape, generator=gen) * 0.1 if v.dim() > 1 else v for k, v in weights.items()}
    save_file(noisy, start / "model.safetensors", metadata={"format": "pt"})
    recipe = root / "experts.yaml"
    recipe.write_text(EXPERTS_RECIPE)
    return {"data": data, "val": val, "start": start, "recipe": recipe}


def _train_experts(setup: dict[str, Path], out: Path, *extra: str) -> int:
    # 2 steps per epoch in each stage (about 16 captions per part, batch 4, 2 micro-batches a step): 4 + 4 steps,
    # validated at every epoch end; stage 1's validations pick each expert's state.
    args = ["train", "--recipe", str(setup["recipe"]), "--model", str(setup["start"]), "--data", str(setup["data"])]
    args += ["--val", str(setup["val"]), "--out", str(out), "--batch-size", "4", "--grad-accum", "2", "--seed", "1"]
    return main([*args, "--no-progress", "--no-manifest", *extra])


def _tensors(run: Path) -> dict[str, torch.Tensor]:
    last = run / "last"
    return {**load_file(last / "model.safetensors"), **load_file(last / "reefcap_experts.safetensors")}


def test_experts_resume_after_a_kill_is_exact(experts_setup, tmp_path, monkeypatch, capsys):
    from reefcap.training.trainer import Trainer

    assert _train_experts(experts_setup, tmp_path / "full") == 0
    full_summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    step = Trainer._step

    def killed(self, wrapped, optimizer, scheduler, batches, stats, state, si):
        if state.global_step == 3:  # inside stage 1, after its first validation and checkpoint (step 2)
            raise KeyboardInterrupt
        return step(self, wrapped, optimizer, scheduler, batches, stats, state, si)

    monkeypatch.setattr(Trainer, "_step", killed)
    assert _train_experts(experts_setup, tmp_path / "cut") == 130
    monkeypatch.undo()
    assert not (tmp_path / "cut" / "last").exists()
    assert json.loads((tmp_path / "cut" / "checkpoint" / "state.json").read_text())["global_step"] == 2
    # Stop again at the end of stage 1 (its selection not applied yet: the resume applies it), then inside
    # stage 2 between validations, then finish.
    for stop in (4, 5):
        assert _train_experts(experts_setup, tmp_path / "cut", "--resume", "--max-steps", str(stop)) == 0
        assert json.loads((tmp_path / "cut" / "checkpoint" / "state.json").read_text())["global_step"] == stop
    capsys.readouterr()
    assert _train_experts(experts_setup, tmp_path / "cut", "--resume") == 0
    cut_summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])

    full, cut = _tensors(tmp_path / "full"), _tensors(tmp_path / "cut")
    assert full.keys() == cut.keys() and {"prompts", "fusion.pool"} <= full.keys()
    assert [k for k in full if not torch.equal(full[k], cut[k])] == []
    losses = {run: {e["step"]: e["loss"] for e in _log(tmp_path / run)} for run in ("full", "cut")}
    assert len(losses["full"]) == 8 and losses["full"] == losses["cut"]
    vals = {run: {e["step"]: e["val_loss"] for e in _log(tmp_path / run, "eval")} for run in ("full", "cut")}
    assert sorted(vals["full"]) == [2, 4, 6, 8] and vals["full"] == vals["cut"]
    # The selection the resume had to carry over: the clear expert's best state is step 2's, saved before the kill.
    stage1 = {e["step"]: e for e in _log(tmp_path / "full", "eval") if e["stage"] == 0}
    assert stage1[2]["val_loss/clear"] < stage1[4]["val_loss/clear"]
    assert stage1[4]["val_loss/coastal"] < stage1[2]["val_loss/coastal"]
    assert full_summary["steps"] == cut_summary["steps"] == 8
    assert full_summary["routing_accuracy_holdout"] == cut_summary["routing_accuracy_holdout"]
    stages = [e["name"] for e in _log(tmp_path / "cut", "stage")]
    assert stages == ["experts", "experts", "experts", "fusion", "fusion"]  # each resume announces its stage


def test_experts_refuse_options_they_cannot_honour(experts_setup, tmp_path, capsys):
    assert _train_experts(experts_setup, tmp_path / "beams", "--eval-beams", "1") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "train.eval_beams" in err[0] and "experts protocol" in err[0], err
    assert not (tmp_path / "beams").exists()
    preserving = tmp_path / "preserving.yaml"
    preserving.write_text(EXPERTS_RECIPE + "preserve: {air_fraction: 0.0}\n")
    assert _train_experts({**experts_setup, "recipe": preserving}, tmp_path / "keep") == 2
    assert "cannot honour `preserve`" in capsys.readouterr().err
    # `reefcap compare` checks every listed recipe before it trains or evaluates anything.
    args = ["compare", "--model", str(experts_setup["start"]), "--data", str(experts_setup["data"])]
    args += ["--recipes", f"pretrain,{experts_setup['recipe']}", "--test", str(experts_setup["val"])]
    args += ["--work", str(tmp_path / "grid"), "--report", str(tmp_path / "r.md"), "--eval-beams", "1"]
    assert main(args) == 2 and "train.eval_beams" in capsys.readouterr().err
    assert not (tmp_path / "grid").exists()
