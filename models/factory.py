"""Model factories: build BLIP captioning checkpoints from scratch, saved exactly like hub checkpoints.

- ``tiny``: a BLIP of a few million parameters with a WordPiece tokenizer trained on given captions; the
  project pretrains it on in-air ReefScenes renderings as its stand-in for BLIP-base.
- ``blip-base-shape``: the real ``Salesforce/blip-image-captioning-base`` configuration (224 M parameters,
  30524-token vocabulary) with random weights, for benchmarks that need realistic cost.

Both are written with ``save_pretrained`` and reload with plain ``transformers``.
"""

from __future__ import annotations

import json
import string
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

from reefcap.models.engines.base import BLIP_PROMPT

FACTORY_CONFIG = "reefcap_factory.json"
# BERT-uncased conventions the base checkpoint uses: pad 0, and [DEC]/[ENC] appended after the vocabulary.
SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
BLIP_BASE_VOCAB = 30522

# Used when no captions are given, so `reefcap model init --kind tiny` works on its own. Words the
# ReefScenes captions and the conditions of underwater imagery use.
DEFAULT_CORPUS = """
a picture of a fish swimming above the coral reef near the sandy bottom
two small yellow fish beside a large green sea turtle over the reef
a stingray resting on the sand below a school of blue fish
a shark swimming in open water in murky green water
a diver with a torch exploring a sunken shipwreck covered in seaweed
an orange starfish on a grey rock next to a pink sea anemone
a jellyfish drifting in the blue water in front of kelp
brain coral and branching coral and fan coral on a rocky bottom
three striped fish in front of a red anemone in clear blue water
a manta ray gliding above the reef in dim turquoise water with floating particles
an eel hiding between rocks under a ledge with a lamp lighting the scene
one large purple fish and four tiny white fish in deep dark water
""".strip().splitlines()


@dataclass(frozen=True)
class TinyConfig:
    """Shape of the tiny BLIP; saved next to the checkpoint as ``reefcap_factory.json``."""

    image_size: int = 96
    patch_size: int = 16
    vision_hidden: int = 128
    vision_layers: int = 4
    text_hidden: int = 128
    text_layers: int = 4
    heads: int = 4
    vocab_size: int = 2000
    max_positions: int = 64
    label_smoothing: float = 0.1
    seed: int = 0


def train_wordpiece(captions: Iterable[str], vocab_size: int, pad_to: int | None = None):
    """Build a BERT-style uncased WordPiece tokenizer from captions, wrapped as the ``BertTokenizer`` BLIP uses.

    The vocabulary is the special tokens, every ASCII letter, digit and punctuation mark (alone and, for
    letters and digits, as a word-internal ``##x`` piece, so any word stays spellable), then the corpus's
    whole words by frequency, ties broken alphabetically. It is built here rather than by the ``tokenizers``
    WordPiece trainer because that trainer breaks frequency ties in hash order: the same captions gave a
    different vocabulary on every run. ``[DEC]`` (decoder BOS) and ``[ENC]`` are added after the vocabulary,
    as in the base checkpoint. With ``pad_to``, ``[unusedN]`` entries first fill the vocabulary to that size,
    so ids match BLIP-base.
    """
    from collections import Counter

    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import BertTokenizer

    normalizer = normalizers.BertNormalizer(clean_text=True, lowercase=True, strip_accents=True)
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    # The prompt must tokenise to whole words, never pieces or [UNK]: every caption starts with it.
    counts = Counter(
        word
        for text in (BLIP_PROMPT, *captions)
        for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text))
    )
    alnum = string.ascii_lowercase + string.digits
    base = [*SPECIAL_TOKENS, *alnum, *string.punctuation, *(f"##{c}" for c in alnum)]
    known = set(base)
    words = [w for w, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])) if w not in known]
    vocab = base + words[: max(0, vocab_size - len(base))]
    tok = Tokenizer(
        models.WordPiece({t: i for i, t in enumerate(vocab)}, unk_token="[UNK]", max_input_chars_per_word=100)
    )
    tok.normalizer = normalizer
    tok.pre_tokenizer = pre_tokenizer
    tok.add_special_tokens(SPECIAL_TOKENS)
    if pad_to is not None:
        vocab = tok.get_vocab()
        filler = [f"[unused{i}]" for i in range(max(0, pad_to - len(vocab)))]
        tok.add_special_tokens(filler)
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    tok.decoder = decoders.WordPiece(prefix="##")
    hf_tok = BertTokenizer(
        tokenizer_object=tok,
        do_lower_case=True,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=512,
    )
    hf_tok.add_special_tokens({"bos_token": "[DEC]", "additional_special_tokens": ["[ENC]"]})
    return hf_tok


def _save(model, tokenizer, image_size: int, out: Path, factory: dict) -> Path:
    from transformers import BlipProcessor
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    out.mkdir(parents=True, exist_ok=True)
    image_processor = BlipImageProcessorPil(size={"height": image_size, "width": image_size})
    BlipProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(out)
    model.save_pretrained(out, safe_serialization=True)
    (out / FACTORY_CONFIG).write_text(json.dumps(factory, indent=2) + "\n")
    return out


def _blip_config(tokenizer, vision: dict, text: dict, label_smoothing: float):
    from transformers import BlipConfig

    text_config = dict(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.sep_token_id,
        sep_token_id=tokenizer.sep_token_id,
        pad_token_id=tokenizer.pad_token_id,
        label_smoothing=label_smoothing,
        **text,
    )
    return BlipConfig(text_config=text_config, vision_config=vision)


def init_tiny(out: str | Path, captions: Iterable[str] | None = None, config: TinyConfig | None = None) -> Path:
    """Write a randomly initialised tiny BLIP captioner with a tokenizer trained on ``captions``."""
    import torch
    from transformers import BlipForConditionalGeneration

    cfg = config or TinyConfig()
    tokenizer = train_wordpiece(captions if captions is not None else DEFAULT_CORPUS, cfg.vocab_size)
    vision = dict(
        hidden_size=cfg.vision_hidden,
        intermediate_size=4 * cfg.vision_hidden,
        num_hidden_layers=cfg.vision_layers,
        num_attention_heads=cfg.heads,
        image_size=cfg.image_size,
        patch_size=cfg.patch_size,
    )
    text = dict(
        hidden_size=cfg.text_hidden,
        intermediate_size=4 * cfg.text_hidden,
        num_hidden_layers=cfg.text_layers,
        num_attention_heads=cfg.heads,
        encoder_hidden_size=cfg.vision_hidden,
        max_position_embeddings=cfg.max_positions,
    )
    torch.manual_seed(cfg.seed)
    model = BlipForConditionalGeneration(_blip_config(tokenizer, vision, text, cfg.label_smoothing))
    return _save(model, tokenizer, cfg.image_size, Path(out), {"kind": "tiny", **asdict(cfg)})


def init_blip_base_shape(out: str | Path, captions: Iterable[str] | None = None, seed: int = 0) -> Path:
    """Write a BLIP-base-shaped captioner (random weights, real sizes and token ids) for benchmarks."""
    import torch
    from transformers import BlipForConditionalGeneration

    tokenizer = train_wordpiece(captions if captions is not None else DEFAULT_CORPUS, 1000, pad_to=BLIP_BASE_VOCAB)
    assert tokenizer.bos_token_id == BLIP_BASE_VOCAB, tokenizer.bos_token_id
    # BlipConfig() defaults are the base checkpoint's shape; only the text head count differs (8 -> 12).
    text = dict(num_attention_heads=12)
    torch.manual_seed(seed)
    model = BlipForConditionalGeneration(_blip_config(tokenizer, {}, text, 0.1))
    return _save(model, tokenizer, 384, Path(out), {"kind": "blip-base-shape", "seed": seed})


FACTORIES = {"tiny": init_tiny, "blip-base-shape": init_blip_base_shape}
