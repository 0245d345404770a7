"""Group-wise quantization of weights and KV cache: pure functions and a small container."""

from flexlab.compress.packing import pack_bits, unpack_bits
from flexlab.compress.quant import CacheQuantConfig, QTensor, QuantConfig, QuantError, dequantize, quantize

__all__ = [
    "CacheQuantConfig",
    "QTensor",
    "QuantConfig",
    "QuantError",
    "dequantize",
    "pack_bits",
    "quantize",
    "unpack_bits",
]
