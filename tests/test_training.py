"""Training pieces on a real tiny BLIP: recipes, parameter groups, targets, the loop itself and exact resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from reefcap.models.errors import ReefcapError
from reefcap.training.config import GROUPS, TrainConfig, load_recipe, recipe_names

pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module")
def records(synthetic):
    from reefcap.training.data import load_records

    return load_records(synthetic)


def _blip(path: Path):
    from transformers import BlipForConditionalGeneration

    return BlipForConditionalGeneration.from_pretrained(path)


# ---- recipes -----------------------------------------------------------------------------------


def test_bundled_recipes_say_what_the_protocols_are():
    assert {"naive", "low_lr", "visual_only", "damf", "damf_preserve", "pretrain"} <= set(recipe_names())
    naive, low, visual, damf = (load_recipe(n) for n in ("naive", "low_lr", "visual_only", "damf"))
    assert [(s.lr, s.groups, s.epochs) for s in naive.stages] == [(5e-5, GROUPS, 5)]
    assert [(s.lr, s.groups) for s in low.stages] == [(1e-5, GROUPS)]
    assert [(s.lr, s.groups) for s in visual.stages] == [(5e-5, ("vision", "coupling"))]
    assert [(s.lr, s.groups, s.epochs) for s in damf.stages] == [
        (5e-5, ("vision", "coupling"), 2),
        (1e-5, GROUPS, 3),
    ]
    # Inherited from base.yaml, not repeated in the protocol files.
    assert all(s.weight_decay == 0.05 and s.schedule == "cosine" for s in damf.stages)
    preserve = load_recipe("damf_preserve")
    assert preserve.stages == damf.stages and preserve.preserve is not None and damf.preserve is None
    assert load_recipe("pretrain").stages[0].lr == 5e-4


def test_recipe_files_extend_and_reject_bad_keys(tmp_path):
    custom = tmp_path / "mine.yaml"
    custom.write_text("base: damf\nstages:\n  - {lr: 2.0e-5}\n")
    recipe = load_recipe(str(custom))
    assert recipe.name == "mine" and recipe.stages[0].lr == 2e-5 and recipe.stages[0].groups == ("vision", "coupling")
    # A child's stage list is the recipe's stage list: stages it leaves out are dropped.
    assert len(recipe.stages) == 1
    two = tmp_path / "two.yaml"
    two.write_text("base: damf\nstages:\n  - {}\n  - {epochs: 1}\n")
    assert [(s.lr, s.epochs) for s in load_recipe(str(two)).stages] == [(5e-5, 2), (1e-5, 1)]
    bad = tmp_path / "bad.yaml"
    bad.write_text("base: base\nstages:\n  - {lr: 1.0e-5, groups: [vision, text]}\n")
    with pytest.raises(ReefcapError, match="groups"):
        load_recipe(str(bad))
    typo = tmp_path / "typo.yaml"
    typo.write_text("base: base\nstages:\n  - {learning_rate: 1.0e-5}\n")
    with pytest.raises(ReefcapError, match="unknown keys"):
        load_recipe(str(typo))
    with pytest.raises(ReefcapError, match="no such file"):
        load_recipe("no_such_recipe")


# ---- parameter groups ---------------------------------------------------------------------------


def test_parameter_groups_cover_blip_and_respect_weight_tying(small_model):
    from reefcap.training.params import apply_stage, group_of, parameter_groups

    model = _blip(small_model)
    groups = parameter_groups(model)
    names = {g: [n for n, _ in ps] for g, ps in groups.items()}
    assert sum(len(v) for v in names.values()) == len(list(model.named_parameters()))
    assert all(n.startswith("vision_model.") for n in names["vision"])
    assert names["coupling"] and all(".crossattention." in n for n in names["coupling"])
    assert all(n.startswith("text_decoder.cls.") for n in names["lm_head"])
    assert group_of("text_decoder.bert.encoder.layer.0.attention.self.query.weight") == "decoder"

    counts = apply_stage(model, ["vision", "coupling"])
    assert counts["decoder"] == 0 and counts["lm_head"] == 0 and counts["vision"] > 0 and counts["coupling"] > 0
    head = model.text_decoder.get_output_embeddings().weight
    assert head is model.text_decoder.get_input_embeddings().weight and not head.requires_grad
    # Training only the LM head trains the tied embedding matrix too: it is the same tensor.
    apply_stage(model, ["lm_head"])
    assert head.requires_grad
    assert not any(p.requires_grad for _, p in groups["vision"])


# ---- targets ------------------------------------------------------------------------------------


def test_targets_put_bos_first_and_mask_prompt_and_padding(small_model):
    from transformers import BlipProcessor

    from reefcap.training.labels import IGNORE, build_targets, preprocess_caption, prompt_length

    assert preprocess_caption("A Red, circle!  On the sand.") == "a red circle on the sand"
    assert len(preprocess_caption(" ".join(["fish"] * 50)).split()) == 30
    tok = BlipProcessor.from_pretrained(small_model, backend="pil").tokenizer
    assert prompt_length(tok) == 4  # [DEC] a picture of
    t = build_targets(tok, ["A red circle.", "a blue square on a dark background"])
    ids, labels, mask = t["input_ids"], t["labels"], t["attention_mask"]
    assert (ids[:, 0] == tok.bos_token_id).all()
    assert (labels[:, :4] == IGNORE).all()
    assert tok.decode(ids[0, 1:4]) == "a picture of"
    assert (labels[mask == 0] == IGNORE).all() and (mask[0] == 0).any()
    kept = labels[0][labels[0] != IGNORE]
    assert tok.decode(kept) == "a red circle [SEP]"  # the caption's own "a" is a target; the prompt's is not


# ---- the loop -----------------------------------------------------------------------------------


def _train(start, records, out, recipe="pretrain", val=None, **cfg):
    from reefcap.training.trainer import Trainer

    base = dict(batch_size=4, eval_beams=1, seed=3)
    rec = load_recipe(recipe) if isinstance(recipe, str) else recipe
    return Trainer(str(start), rec, TrainConfig(**{**base, **cfg}), out, records, val, progress=False).run()


def test_training_loop_learns_and_logs(small_model, records, tmp_path):
    recipe = load_recipe("pretrain").scaled(3 / 40)  # 3 epochs of 8 steps
    summary = _train(small_model, records, tmp_path / "run", recipe, val=records[:4], eval_every_epochs=3)
    assert summary["finished"] and summary["steps"] == 24 and summary["best_step"] > 0
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    train = [e for e in log if e["type"] == "train"]
    assert len(train) == 24
    first, last = sum(e["loss"] for e in train[:4]) / 4, sum(e["loss"] for e in train[-4:]) / 4
    assert last < first - 0.5, (first, last)
    assert all(f"grad_norm/{g}" in train[-1] and f"grad_var/{g}" in train[-1] for g in GROUPS)
    assert any(e["type"] == "eval" and "CIDEr" in e for e in log)
    assert list((tmp_path / "run" / "tb").glob("events.out.tfevents.*"))
    saved = json.loads((tmp_path / "run" / "best" / "reefcap_train.json").read_text())
    assert saved["recipe"]["name"] == "pretrain" and saved["train"]["batch_size"] == 4

    from reefcap.models.engines.loader import load_engine

    engine = load_engine(str(tmp_path / "run" / "best"), backend="torch")
    assert len(engine.caption([records[0].path])) == 1


def test_stage_trains_only_its_groups(small_model, records, tmp_path):
    from reefcap.training.params import group_of

    recipe = load_recipe("visual_only").scaled(0.2)
    _train(small_model, records, tmp_path / "vis", recipe)
    before = load_file(small_model / "model.safetensors")
    after = load_file(tmp_path / "vis" / "last" / "model.safetensors")
    changed = {group_of(k) for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"vision", "coupling"}


def test_resume_continues_exactly(small_model, records, tmp_path):
    recipe = load_recipe("damf").scaled(0.25)  # stage 1: 4 steps, stage 2: 6 steps
    full = _train(small_model, records, tmp_path / "full", recipe, checkpoint_every=1)
    assert full["finished"] and full["steps"] == 10
    cut = _train(small_model, records, tmp_path / "cut", recipe, max_steps=6)  # stops inside stage 2
    assert not cut["finished"] and cut["steps"] == 6
    from reefcap.training.trainer import Trainer

    resumed = Trainer(
        str(small_model),
        recipe,
        TrainConfig(batch_size=4, eval_beams=1, seed=3),
        tmp_path / "cut",
        records,
        progress=False,
    ).run(resume=True)
    assert resumed["finished"] and resumed["steps"] == 10
    a = load_file(tmp_path / "full" / "last" / "model.safetensors")
    b = load_file(tmp_path / "cut" / "last" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    losses = {}
    for run in ("full", "cut"):
        log = [json.loads(x) for x in (tmp_path / run / "log.jsonl").read_text().splitlines()]
        losses[run] = {e["step"]: e["loss"] for e in log if e["type"] == "train"}
    assert losses["full"] == losses["cut"]


def test_preservation_mixes_in_air_images(small_model, records, tmp_path):
    recipe = load_recipe("damf_preserve").scaled(0.2)
    with pytest.raises(ReefcapError, match="preserve"):
        _train(small_model, records, tmp_path / "none", recipe)
    from reefcap.training.trainer import Trainer

    out = tmp_path / "keep"
    Trainer(
        str(small_model), recipe, TrainConfig(batch_size=4, seed=1), out, records[:8], None, records[8:], progress=False
    ).run()
    train = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines() if '"train"' in x]
    assert all("distill" in e and "l2" in e for e in train)
    assert train[0]["l2"] == 0.0 and train[-1]["l2"] > 0.0 and train[-1]["distill"] > 0.0


def test_augmentations_are_seeded_and_optionally_underwater(records):
    import numpy as np
    from PIL import Image

    from reefcap.training.augment import TrainTransform
    from reefcap.training.config import AugmentConfig

    img = Image.open(records[0].path).convert("RGB")
    official = TrainTransform(48, AugmentConfig())
    a, b = (np.asarray(official(img, np.random.default_rng([1, 2, 3]))) for _ in range(2))
    assert a.shape == (48, 48, 3) and np.array_equal(a, b)
    outs = {np.asarray(official(img, np.random.default_rng(s))).tobytes() for s in range(6)}
    assert len(outs) == 6
    plain = np.asarray(TrainTransform(48, AugmentConfig(enabled=False))(img, np.random.default_rng(0)), float)
    water = np.asarray(
        TrainTransform(48, AugmentConfig(enabled=False, underwater_p=1.0))(img, np.random.default_rng(0)), float
    )
    # Water absorbs red first: the underwater rendering shifts colour away from red towards blue-green.
    shift = lambda x: x[..., 1:].mean() - x[..., 0].mean()  # noqa: E731
    assert shift(water) > shift(plain)
