"""Model factories: token conventions of BLIP-base, tiny model size, the base-shape configuration."""

from __future__ import annotations

import json

import pytest

from reefcap.models.factory import BLIP_BASE_VOCAB, DEFAULT_CORPUS, _blip_config, init_blip_base_shape, train_wordpiece


def test_tokenizer_follows_blip_conventions():
    tok = train_wordpiece(DEFAULT_CORPUS, 500)
    assert tok.pad_token_id == 0
    assert tok.bos_token == "[DEC]" and tok.bos_token_id == len(tok) - 2
    ids = tok("a picture of").input_ids
    assert ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id
    assert tok.unk_token_id not in ids, "the BLIP prompt must tokenise to known words"
    assert tok.decode(tok("A Fish swimming").input_ids, skip_special_tokens=True) == "a fish swimming"
    assert tok.unk_token_id not in tok("zebra-fish #42, qux!").input_ids


def test_tiny_checkpoint_shape(tiny_model):
    config = json.loads((tiny_model / "config.json").read_text())
    factory = json.loads((tiny_model / "reefcap_factory.json").read_text())
    assert factory["kind"] == "tiny"
    assert config["text_config"]["bos_token_id"] == config["text_config"]["vocab_size"] - 2
    assert config["text_config"]["label_smoothing"] == 0.1
    assert config["vision_config"]["image_size"] == 96
    assert list(tiny_model.glob("*.safetensors")) and not list(tiny_model.glob("*.bin"))


def test_blip_base_shape_ids_and_config():
    tok = train_wordpiece(DEFAULT_CORPUS, 1000, pad_to=BLIP_BASE_VOCAB)
    assert tok.bos_token_id == 30522 and len(tok) == 30524 and tok.sep_token_id == 3
    cfg = _blip_config(tok, {}, {"num_attention_heads": 12}, 0.1)
    v, t = cfg.vision_config, cfg.text_config
    assert (v.image_size, v.patch_size, v.hidden_size, v.num_hidden_layers, v.num_attention_heads) == (
        384,
        16,
        768,
        12,
        12,
    )
    assert (t.vocab_size, t.hidden_size, t.num_hidden_layers, t.num_attention_heads, t.bos_token_id) == (
        30524,
        768,
        12,
        12,
        30522,
    )


@pytest.mark.slow
def test_blip_base_shape_full_init(tmp_path):
    from transformers import BlipForConditionalGeneration

    out = init_blip_base_shape(tmp_path / "base")
    model = BlipForConditionalGeneration.from_pretrained(out)
    assert 220e6 < sum(p.numel() for p in model.parameters()) < 230e6
