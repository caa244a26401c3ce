"""Data-free quantized exports in the compressed-tensors format vLLM loads (`rlexport export --quantize`).

schemes.py holds the formulas (bit for bit those of compressed-tensors 0.19 / llm-compressor 0.14), plan.py
decides which tensors are quantized and builds the row-block loaders and the `quantization_config`, names.py maps
compressed-tensors tensor names back to the dense parameters for the structure checks.
"""
from .schemes import SCHEMES, Scheme, get_scheme
from .plan import quantize_refs

__all__ = ["SCHEMES", "Scheme", "get_scheme", "quantize_refs"]
