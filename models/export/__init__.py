"""Export: a checkpoint as the two ONNX graphs the ONNX Runtime engine runs (fp32, fp16, int8), the cache of
exports made on first use, and the ``reefcap export`` / ``reefcap agreement`` commands (:mod:`.cli`)."""
