"""GuiDG water-type experts: the recipe's domains, training end to end on tiny ReefScenes, loading from
safetensors, batch-independent captions with a per-image water type in both engines, ONNX/torch parity, and the
server answering with ``water_type`` through its default ONNX backend."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from reefcap.models.engines.base import DecodeOptions
from reefcap.models.engines.experts import EXPERTS_WEIGHTS, ExpertsConfig, is_experts, modules, save_experts
from reefcap.models.engines.loader import load_engine
from reefcap.models.errors import ModelLoadError

DOMAINS = {"clear": ["I", "IA", "IB"], "ocean": ["II", "III"], "coastal": ["1C", "3C", "5C"], "in_air": []}
BUNDLED = "reefscenes-tiny-guidg"


@pytest.fixture(scope="module")
def experts_model(tmp_path_factory) -> Path:
    """The bundled DAMF model with three random experts whose fusion clearly prefers one expert per image."""
    import torch

    from reefcap.models.engines.torch_engine import load_blip
    from reefcap.models.registry import resolve_model

    out = tmp_path_factory.mktemp("experts") / "experts"
    shutil.copytree(resolve_model("reefscenes-tiny-damf").path, out, ignore=shutil.ignore_patterns("manifest.json"))
    blip, _ = load_blip(resolve_model(str(out)))
    _, ExpertsHead = modules()
    torch.manual_seed(3)
    config = ExpertsConfig(domains=DOMAINS, context=2)
    head = ExpertsHead(config, blip.config.vision_config.hidden_size, blip.config.text_config.hidden_size)
    with torch.no_grad():
        head.prompts.mul_(25)  # experts that really differ, so a mixed-up row changes the caption
        head.fusion.query.weight.mul_(20)
        head.fusion.logit_scale.fill_(4.0)
    save_experts(out, head)
    return out


@pytest.fixture(scope="module")
def photos(euvp_images) -> list[Path]:
    return euvp_images[:6]


@pytest.fixture(scope="module")
def torch_engine(experts_model):
    return load_engine(str(experts_model), backend="torch")


@pytest.fixture(scope="module")
def onnx_cache(experts_model, tmp_path_factory) -> Path:
    """A REEFCAP_CACHE holding the experts model's fp32 export where first use would put it."""
    from reefcap.models.engines.torch_engine import weights_version
    from reefcap.models.export.onnx import export_onnx

    cache = tmp_path_factory.mktemp("cache")
    export_onnx(str(experts_model), cache / "onnx" / f"{weights_version(experts_model)}-fp32")
    return cache


@pytest.fixture(scope="module")
def onnx_engine(onnx_cache):
    return load_engine(str(next((onnx_cache / "onnx").iterdir())), backend="onnx")


def test_recipe_declares_the_grouping_and_images_map_to_domains():
    from reefcap.training.config import load_recipe

    recipe = load_recipe("guidg")
    config = ExpertsConfig(domains=recipe.experts.domains)
    assert [s.groups for s in recipe.stages] == [("prompts",), ("vision", "fusion")]
    assert config.domain_of({"water_type": "9C", "turbidity": 2.0}) == "turbid_coastal"
    assert config.domain_of({"water_type": "IB"}) == "clear_ocean"
    assert config.domain_of({"background": "rocky bottom"}) == "in_air"  # no water type: photographed in air
    assert config.domain_of({"water_type": "XX"}) is None
    types = [t for ts in recipe.experts.domains.values() for t in ts]
    assert sorted(types) == sorted(["I", "IA", "IB", "II", "III", "1C", "3C", "5C", "7C", "9C"])


def test_torch_captions_carry_water_type_and_ignore_batch_mates(torch_engine, photos):
    assert type(torch_engine).__name__ == "TorchExpertsEngine"
    for options in (DecodeOptions.greedy(), DecodeOptions(num_beams=3)):
        batch = torch_engine.caption(photos, options)
        alone = [torch_engine.caption([p], options)[0] for p in photos]
        assert [c.caption for c in batch] == [c.caption for c in alone]
        for b, a in zip(batch, alone, strict=True):
            assert b.water_type["label"] == a.water_type["label"]
            assert b.water_type["probability"] == pytest.approx(a.water_type["probability"], abs=1e-3)
    labels = {c.water_type["label"] for c in batch}
    assert labels <= set(DOMAINS) and all(0.25 <= c.water_type["probability"] <= 1 for c in batch)
    assert len({c.caption for c in batch}) > 1  # captions depend on the image


def test_experts_change_the_caption_and_plain_models_have_no_water_type(torch_engine, photos):
    plain = load_engine("reefscenes-tiny-damf", backend="torch").caption(photos, DecodeOptions.greedy())
    assert all(c.water_type is None for c in plain)
    mixed = torch_engine.caption(photos, DecodeOptions.greedy())
    assert [c.caption for c in mixed] != [c.caption for c in plain]


def test_onnx_matches_torch_and_is_batch_independent(torch_engine, onnx_engine, photos):
    assert type(onnx_engine).__name__ == "OnnxExpertsEngine"
    assert onnx_engine.manifest["experts"]["domains"] == DOMAINS
    for options in (DecodeOptions.greedy(), DecodeOptions(num_beams=3)):
        want = torch_engine.caption(photos, options)
        got = onnx_engine.caption(photos, options)
        assert [c.caption for c in got] == [c.caption for c in want]
        assert [c.water_type["label"] for c in got] == [c.water_type["label"] for c in want]
        for g, w in zip(got, want, strict=True):
            assert g.water_type["probability"] == pytest.approx(w.water_type["probability"], abs=1e-3)
            assert g.confidence == pytest.approx(w.confidence, abs=1e-3)
    alone = [onnx_engine.caption([p], DecodeOptions.greedy())[0].caption for p in photos[::-1]]
    assert alone[::-1] == [c.caption for c in onnx_engine.caption(photos, DecodeOptions.greedy())]


def test_experts_load_from_safetensors_and_a_broken_file_is_a_load_error(experts_model, torch_engine, tmp_path):
    from safetensors.torch import load_file

    saved = load_file(str(experts_model / EXPERTS_WEIGHTS))
    assert set(saved) >= {"prompts", "fusion.query.weight", "fusion.key.weight", "fusion.pool"}
    assert (torch_engine.head.prompts.detach() == saved["prompts"]).all()
    assert is_experts(experts_model) and not any(experts_model.glob("*.bin"))
    broken = tmp_path / "broken"
    shutil.copytree(experts_model, broken)
    (broken / EXPERTS_WEIGHTS).write_bytes(b"not safetensors")
    with pytest.raises(ModelLoadError, match=EXPERTS_WEIGHTS):
        load_engine(str(broken), backend="torch")


@pytest.fixture(scope="module")
def reefscenes(tmp_path_factory) -> Path:
    from reefcap.models.reefscenes.dataset import ReefScenesConfig, generate

    out = tmp_path_factory.mktemp("rs")
    generate(out, ReefScenesConfig(seed=1, size=48, counts={"surface": 24, "underwater": 40}, workers=1), False)
    return out


def test_guidg_trains_from_the_recipe_and_the_result_serves_water_types(reefscenes, tmp_path, capsys):
    from reefcap.cli import main

    out = tmp_path / "run"
    recipe = tmp_path / "guidg_selected.yaml"  # GuiDG's per-expert selection on its domain's validation loss
    recipe.write_text("base: guidg\nexperts:\n  select_on_val: true\n")
    args = ["train", "--recipe", str(recipe), "--model", "reefscenes-tiny", "--out", str(out), "--no-progress"]
    args += ["--val", str(reefscenes / "underwater" / "val.json")]
    # Epochs x0.02: 2 steps of experts, 1 of fusion (GuiDG runs through the Trainer: --max-steps would stop the run).
    args += ["--data", str(reefscenes / "underwater" / "train.json"), "--batch-size", "4", "--epochs-scale", "0.02"]
    args += ["--preserve-data", str(reefscenes / "surface" / "train.json")]
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["finished"] and 0 <= summary["routing_accuracy_holdout"] <= 1
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [e["name"] for e in log if e["type"] == "stage"] == ["experts", "fusion"]
    evals = [e for e in log if e["type"] == "eval"]
    assert evals and all(v > 0 for e in evals for k, v in e.items() if k.startswith("val_loss/"))
    assert all(e["loss"] > 0 for e in log if e["type"] == "train")
    best = out / "best"
    assert is_experts(best) and (best / "model.safetensors").is_file()
    engine = load_engine(str(best), backend="torch")
    caption = engine.caption([next((reefscenes / "underwater" / "images").iterdir())], DecodeOptions.greedy())[0]
    assert caption.water_type["label"] in json.loads((best / "reefcap_experts.json").read_text())["domains"]
    # `reefcap eval` scores each water domain and how often the estimated water type was right.
    result = tmp_path / "eval.json"
    data = str(reefscenes / "underwater" / "test.json")
    assert (
        main(["eval", "--model", str(best), "--data", data, "--out", str(result), "--no-meteor", "--no-progress"]) == 0
    )
    payload = json.loads(result.read_text())
    assert payload["domains"] and all(0 <= m["routing_accuracy"] <= 1 for m in payload["domains"].values())
    assert sum(m["images"] for m in payload["domains"].values()) == payload["metrics"]["images"]
    predictions = json.loads(Path(payload["predictions"]).read_text())
    labels = json.loads((best / "reefcap_experts.json").read_text())["domains"]
    assert len(predictions) == payload["metrics"]["images"]
    assert all(p["water_type"]["label"] in labels for p in predictions)
    capsys.readouterr()
    # A finished experts run resumes like any other: nothing left to train, the same summary.
    assert main([*args, "--resume", "--no-manifest"]) == 0
    again = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert again["finished"] and again["routing_accuracy_holdout"] == summary["routing_accuracy_holdout"]
    # Without in-air data the in-air expert has nothing to learn from: a one-line error before any training.
    args_no_air = args[:-2] + ["--out", str(tmp_path / "again")]
    assert main(args_no_air) == 2
    assert "in_air" in capsys.readouterr().err


def test_per_domain_scores_and_routing_accuracy_from_predictions(reefscenes):
    from reefcap.models.data.datasets import load_dataset
    from reefcap.training.compare import _domain_table
    from reefcap.training.config import load_recipe
    from reefcap.training.evaluation import domain_metrics

    domains = load_recipe("guidg").experts.domains
    grouping = ExpertsConfig(domains=domains)
    per, images = {}, 0
    for split in ("underwater", "surface"):  # evaluated one split at a time, as `reefcap compare` does
        records = load_dataset(reefscenes / split / "train.json")
        images += len(records)
        # Perfect captions; underwater images routed to their domain, in-air ones to "ocean" (wrong).
        routed = {r.image_id: grouping.domain_of(r.metadata) for r in records}
        routed = {k: "ocean" if v == "in_air" else v for k, v in routed.items()}
        preds = [
            {"image_id": r.image_id, "caption": r.captions[0], "water_type": {"label": routed[r.image_id]}}
            for r in records
        ]
        per.update(domain_metrics(records, preds, domains))
    assert per["in_air"]["routing_accuracy"] == 0 and per["in_air"]["Bleu_4"] == pytest.approx(1)
    underwater = [d for d in per if d != "in_air"]
    assert underwater and all(per[d]["routing_accuracy"] == 1 and per[d]["Bleu_4"] > 0.99 for d in underwater)
    assert sum(m["images"] for m in per.values()) == images
    table = _domain_table({"guidg": [{"domains": per}], "start": [{"in-air": {}}]})
    assert table[0].startswith("| protocol | clear_ocean CIDEr") and table[0].endswith("routing accuracy |")
    row = next(line for line in table if line.startswith("| guidg |"))
    want = sum(per[d]["images"] for d in underwater) / images
    assert row.endswith(f"| {want:.3f} ± 0.000 |")
    assert next(line for line in table if line.startswith("| start |")).endswith("| - |")


def test_compare_refuses_a_run_that_starts_from_a_later_recipe(tmp_path, capsys):
    from reefcap.cli import main

    args = ["compare", "--model", "reefscenes-tiny", "--recipes", "guidg@damf,damf", "--data", "x.json"]
    assert main([*args, "--test", "t.json", "--work", str(tmp_path), "--report", str(tmp_path / "r.md")]) == 2
    assert "list damf before it" in capsys.readouterr().err


@pytest.fixture(scope="module")
def guidg_cache(tmp_path_factory) -> Path:
    """A REEFCAP_CACHE holding the bundled experts model's fp32 export where first use would put it."""
    from reefcap.models.engines.torch_engine import weights_version
    from reefcap.models.export.onnx import export_onnx
    from reefcap.models.registry import resolve_model

    cache = tmp_path_factory.mktemp("guidg-cache")
    export_onnx(BUNDLED, cache / "onnx" / f"{weights_version(resolve_model(BUNDLED).path)}-fp32")
    return cache


def test_bundled_experts_model_matches_its_manifest():
    from reefcap.models.registry import sha256_file, zoo_models

    path = zoo_models()[BUNDLED]
    manifest = json.loads((path / "manifest.json").read_text())
    assert {"reefcap_experts.json", "reefcap_experts.safetensors", "model.safetensors"} <= set(manifest["files"])
    assert all(sha256_file(path / f) == h for f, h in manifest["files"].items())
    for split in ("underwater", "surface"):
        assert {"CIDEr", "Bleu_4", "METEOR", "ROUGE_L"} <= set(manifest["metrics"][split])
    assert manifest["recipe"] == "guidg_routed" and is_experts(path)


@pytest.fixture(scope="module")
def guidg_server(guidg_cache, tmp_path_factory):
    """`reefcap serve --model reefscenes-tiny-guidg` with REEFCAP_BACKEND unset: auto, i.e. ONNX Runtime."""
    from server_helpers import LiveServer

    tmp = tmp_path_factory.mktemp("guidg-server")
    env = {"REEFCAP_MODEL": BUNDLED, "REEFCAP_FALLBACK": "none", "REEFCAP_DEVICE": "cpu"}
    env |= {"REEFCAP_CACHE": str(guidg_cache), "REEFCAP_FEEDBACK_DB": str(tmp / "fb.sqlite3")}
    srv = LiveServer(env, tmp / "server.log")
    yield srv
    srv.stop()


def test_server_answers_water_type_per_image_through_the_default_onnx_backend(guidg_server, photos):
    """ONNX Runtime (the default backend), a water type per image whatever the batch, counted in Prometheus by
    estimated type."""
    import httpx
    from server_helpers import metric

    srv = guidg_server
    files = [("images", (p.name, p.read_bytes(), "image/jpeg")) for p in photos[:4]]
    before = srv.metrics()
    together = httpx.post(srv.url + "/v1/captions", files=files, timeout=60).json()["results"]
    alone = [httpx.post(srv.url + "/v1/captions", files=[f], timeout=60).json()["results"][0] for f in files]
    text = srv.metrics()
    assert "reefcap_water_type_images_total{" not in before
    domains = json.loads((resolve_zoo() / "reefcap_experts.json").read_text())["domains"]
    assert all(r["model"]["backend"] == "onnx" and r["model"]["name"] == BUNDLED for r in together)
    assert [r["caption"] for r in together] == [r["caption"] for r in alone]
    assert [r["water_type"]["label"] for r in together] == [r["water_type"]["label"] for r in alone]
    assert all(r["water_type"]["label"] in domains and 0 < r["water_type"]["probability"] <= 1 for r in together)
    served = [r["water_type"]["label"] for r in together]
    for label in domains:
        if label in served:
            assert metric(text, "reefcap_water_type_images_total", model=BUNDLED, water_type=label) == 2 * served.count(
                label
            )
        else:
            assert f'water_type="{label}"' not in text


@pytest.mark.heavy  # a headless Chromium
def test_web_page_shows_the_water_type(guidg_server, photos):
    import httpx
    from server_helpers import headless_page

    with headless_page() as page:
        page.goto(guidg_server.url + "/")
        page.set_input_files("#files", str(photos[1]))
        page.wait_for_selector("#results tbody tr.done", timeout=60_000)
        shown = page.text_content("#results tbody tr.done .water")
    files = [("images", ("x.jpg", photos[1].read_bytes(), "image/jpeg"))]
    water = httpx.post(guidg_server.url + "/v1/captions", files=files, timeout=60).json()["results"][0]["water_type"]
    assert shown == f"{water['label']} ({water['probability']:.2f})"


def resolve_zoo() -> Path:
    from reefcap.models.registry import zoo_models

    return zoo_models()[BUNDLED]


def test_training_and_serving_give_an_expert_the_same_next_token_logits(experts_model, photos):
    """The trainer's view of an expert (HF decoder, inputs_embeds, position ids) and the engines' graphs
    (extended embedding table, positions from the cache length) must be the same function."""
    import torch

    from reefcap.models.data.images import load_image
    from reefcap.models.engines.experts import context_ids, load_experts
    from reefcap.models.engines.experts_graphs import experts_decoder, experts_encoder
    from reefcap.models.engines.torch_engine import load_blip
    from reefcap.models.registry import resolve_model
    from reefcap.training.experts import with_context

    blip, processor = load_blip(resolve_model(str(experts_model)))
    head = load_experts(experts_model, blip)
    pixels = processor.image_processor(images=[load_image(photos[0])], return_tensors="pt")["pixel_values"]
    tokens = [blip.config.text_config.bos_token_id, *processor.tokenizer("a picture of a fish")["input_ids"][1:-1]]
    ids = torch.tensor([tokens])
    text = blip.config.text_config
    ctx = context_ids(text.vocab_size, len(DOMAINS), head.config.context)
    weights, *cross = experts_encoder(blip, head)(pixels)
    decoder = experts_decoder(blip, head)
    dim = text.hidden_size // text.num_attention_heads
    with torch.no_grad():
        image = blip.vision_model(pixel_values=pixels).last_hidden_state
        for e in range(len(DOMAINS)):
            embeds, mask, _, positions = with_context(
                blip.text_decoder, ids, torch.ones_like(ids), ids, head.prompts[[e]]
            )
            out = blip.text_decoder(
                inputs_embeds=embeds, attention_mask=mask, position_ids=positions, encoder_hidden_states=image
            )
            row = torch.tensor([[tokens[0], *ctx[e], *tokens[1:]]])
            past = [torch.zeros(1, text.num_attention_heads, 0, dim)] * (2 * text.num_hidden_layers)
            served = decoder(row, torch.tensor([0]), *past, *cross)[0][0]
            assert torch.allclose(out.logits[0, -1], served, atol=1e-4)
    assert torch.allclose(weights, head.weights(image), atol=1e-6) and weights.sum().item() == pytest.approx(1)


def test_caption_cli_lines_carry_water_type(experts_model, photos, tmp_path, capsys):
    from reefcap.cli import main

    out = tmp_path / "out.jsonl"
    args = ["caption", *map(str, photos[:2]), "--model", str(experts_model), "--backend", "torch"]
    assert main([*args, "--fallback", "none", "--greedy", "-o", str(out)]) == 0
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(lines) == 2 and all(line["water_type"]["label"] in DOMAINS for line in lines)
    capsys.readouterr()
