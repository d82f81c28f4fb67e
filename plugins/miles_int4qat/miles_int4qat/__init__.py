"""miles-int4qat: INT4 quantization-aware training with packed INT4 rollout weights.

Training sees per-group symmetric fake-quantized weights (straight-through gradient); the rollout engine
holds the same weights as real packed INT4 (eight nibbles per int32 plus per-group scales).
"""

__version__ = "0.1.0"
