"""The PyTorch CaptionEngine on real tiny BLIP checkpoints."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from reefcap.models.engines.base import Caption, CaptionEngine, DecodeOptions, EngineConfig, require_positive
from reefcap.models.engines.torch_engine import TorchCaptionEngine
from reefcap.models.errors import InvalidOptionsError, ReefcapError


@pytest.fixture(scope="module")
def engine(varied_model):
    return TorchCaptionEngine.load(str(varied_model), EngineConfig(device="cpu"))


def test_batched_greedy_equals_one_by_one(engine, euvp_images):
    images = euvp_images[:10]
    batched = engine.caption(images, DecodeOptions.greedy())
    single = [engine.caption([p], DecodeOptions.greedy())[0] for p in images]
    assert len({c.caption for c in single}) >= 3, "captions must differ by image or this test proves nothing"
    assert [c.caption for c in batched] == [c.caption for c in single]
    for b, s in zip(batched, single, strict=True):
        assert b.confidence == pytest.approx(s.confidence, abs=1e-4)


def test_caption_fields(engine, euvp_images):
    captions = engine.caption(euvp_images[:3])
    assert len(captions) == 3
    for c in captions:
        assert isinstance(c, Caption)
        assert c.model == engine.describe().name == "varied"
        assert -50 < c.confidence <= 0
        assert 1 <= c.tokens <= 16  # max_length 20 minus the 4 prompt tokens
        assert not c.caption.startswith("a picture of")


def test_beam_search_scores_at_least_greedy(engine, euvp_images):
    greedy = engine.caption(euvp_images[:4], DecodeOptions.greedy())
    beam = engine.caption(euvp_images[:4], DecodeOptions(num_beams=3))
    # Beam search maximises total log-probability; it should not do worse than greedy on average.
    assert sum(b.confidence * b.tokens for b in beam) >= sum(g.confidence * g.tokens for g in greedy) - 1e-3


def test_beam_search_on_early_stopping_model(tiny_model, euvp_images):
    """A fresh model ends beams early at different lengths: scores and tokens must still line up."""
    eng = TorchCaptionEngine.load(str(tiny_model), EngineConfig(device="cpu"))
    for options in (DecodeOptions(num_beams=3), DecodeOptions(num_beams=5, max_length=30), DecodeOptions.greedy()):
        captions = eng.caption(euvp_images[:3], options)
        assert len(captions) == 3
        assert all(1 <= c.tokens <= options.max_length - 4 and c.confidence < 0 for c in captions)


def test_max_length_bounds_tokens(engine, euvp_images):
    captions = engine.caption(euvp_images[:2], DecodeOptions.greedy(max_length=8, min_length=2))
    assert all(c.tokens <= 4 for c in captions)


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_reduced_precision_runs(varied_model, euvp_images, dtype):
    eng = TorchCaptionEngine.load(str(varied_model), EngineConfig(device="cpu", dtype=dtype))
    assert eng.describe().dtype == dtype
    assert len(eng.caption(euvp_images[:2], DecodeOptions.greedy())) == 2


def test_describe(engine, varied_model):
    info = engine.describe()
    assert info.backend == "torch" and info.device == "cpu" and info.dtype == "fp32"
    assert 1_000_000 < info.parameters < 10_000_000
    assert len(info.version) == 12
    assert TorchCaptionEngine.load(str(varied_model)).describe().version == info.version


def test_decode_options_validation():
    with pytest.raises(InvalidOptionsError, match="num_beams"):
        DecodeOptions(num_beams=-2).validate()
    with pytest.raises(InvalidOptionsError, match="min_length"):
        DecodeOptions(min_length=30, max_length=20).validate()
    # Still a ValueError, and a ReefcapError (what the CLI turns into exit status 2).
    assert issubclass(InvalidOptionsError, ValueError) and issubclass(InvalidOptionsError, ReefcapError)


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:0", "cuda:12"])
def test_engine_config_accepts_device_forms(device):
    assert EngineConfig(device=device).device == device


@pytest.mark.parametrize("device", ["gpu", "cuda:x", "cuda:", "CPU", "mps", "", "cuda:-1"])
def test_engine_config_rejects_other_devices_naming_the_accepted_forms(device):
    with pytest.raises(InvalidOptionsError, match=r"auto, cpu, cuda or cuda:N"):
        EngineConfig(device=device)


@pytest.mark.parametrize("value", [0, -3, 1.5, True, None])
def test_require_positive(value):
    assert require_positive("batch_size", 4) == 4
    with pytest.raises(InvalidOptionsError, match="batch_size must be at least 1"):
        require_positive("batch_size", value)


def test_missing_engine_method_fails_at_class_definition():
    with pytest.raises(TypeError, match="describe"):

        class Incomplete(CaptionEngine):  # noqa: F841 - defining it is the test
            @classmethod
            def load(cls, model, config=None):
                return cls()

            def preprocess(self, images):
                return images

            def generate(self, batch, options):
                return []


def test_engine_must_return_one_caption_per_image(euvp_images):
    class Lossy(CaptionEngine):
        @classmethod
        def load(cls, model, config=None):
            return cls()

        def preprocess(self, images):
            return images

        def generate(self, batch, options):
            return [Caption("x", "lossy", 0.0, 1)] * (len(batch) - 1)

        def describe(self):
            raise NotImplementedError

    with pytest.raises(RuntimeError, match="returned 1 captions for 2 images"):
        Lossy().caption(euvp_images[:2])


def test_checkpoint_reloads_with_plain_transformers(engine, varied_model, euvp_images):
    """The saved checkpoint is a normal HF BLIP: plain transformers, no reefcap import, same greedy caption."""
    script = textwrap.dedent(
        f"""
        import json, sys
        from PIL import Image
        from transformers import BlipForConditionalGeneration, BlipProcessor
        proc = BlipProcessor.from_pretrained({str(varied_model)!r})
        model = BlipForConditionalGeneration.from_pretrained({str(varied_model)!r}).eval()
        image = Image.open({str(euvp_images[0])!r}).convert("RGB")
        inputs = proc(images=image, text="a picture of", return_tensors="pt")
        out = model.generate(**inputs, num_beams=1, max_length=20, min_length=5)
        text = proc.decode(out[0], skip_special_tokens=True)
        assert not any(m.startswith("reefcap") for m in sys.modules)
        print(json.dumps(text))
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    plain = json.loads(result.stdout.strip().splitlines()[-1])
    ours = engine.caption([euvp_images[0]], DecodeOptions.greedy())[0].caption
    assert plain.startswith("a picture of")
    assert plain[len("a picture of") :].strip() == ours
