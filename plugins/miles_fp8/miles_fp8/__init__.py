"""miles-fp8: unified FP8 (e4m3) training and rollout for miles, with HF FP8 checkpoint I/O.

Public pieces: `quant.quantize` / `dequantize` (the one quantization function), `linear.Fp8Linear` /
`Fp8Experts` / `convert_model`, `checkpoint.convert_to_fp8` / `convert_from_fp8`. Hooks are in `plugin`.
"""

__version__ = "0.1.0"
