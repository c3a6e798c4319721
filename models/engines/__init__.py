"""Engines: the ``CaptionEngine`` interface, the backend registry and the backends that implement it.

- :mod:`.base`: the interface and the records it speaks in (``DecodeOptions``, ``EngineConfig``, ``Caption``,
  ``EngineInfo``);
- :mod:`.backends`: backend name (and checkpoint kind) to engine class, imported lazily;
- :mod:`.torch_engine` and :mod:`.onnx_engine`: PyTorch and ONNX Runtime, each with a water-type experts variant
  (:mod:`.experts_torch`, :mod:`.experts_onnx`) registered as its own backend entry;
- :mod:`.graphs` and :mod:`.experts_graphs`: the model's two graphs (image encoder, KV-cached decoder) as torch
  modules, run eagerly here and traced by :mod:`reefcap.models.export`;
- :mod:`.decoding`: greedy and beam search over a decoder step, in numpy; :mod:`.pixels`: fast preprocessing;
- :mod:`.precision`: which precision a checkpoint is served in (the int8 agreement rule).

Nothing here imports torch or onnxruntime until an engine of that backend loads.
"""
