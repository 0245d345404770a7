"""Bit packing of small unsigned codes into bytes, for 2, 3, 4 and 8 bits.

Codes are packed in *units*: the fewest codes that fill whole bytes (4 two-bit codes in one byte,
2 four-bit codes in one byte, 8 three-bit codes in three bytes, one eight-bit code per byte), so
a 3-bit code really takes 3 bits. Code ``i`` of a unit sits at bit ``bits * i`` of the unit's
little-endian word.

    >>> import torch
    >>> codes = torch.tensor([1, 7, 0, 5, 3, 2, 6, 4], dtype=torch.uint8)
    >>> packed = pack_bits(codes, 3)
    >>> packed.numel(), bool((unpack_bits(packed, 3) == codes).all())
    (3, True)
"""

from __future__ import annotations

from math import lcm

import torch

SUPPORTED_BITS = (2, 3, 4, 8)


def unit(bits: int) -> tuple[int, int]:
    """(codes per unit, bytes per unit) for ``bits``-bit codes."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits={bits!r} is not supported; use one of {SUPPORTED_BITS}")
    word = lcm(bits, 8)
    return word // bits, word // 8


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack uint8 ``codes`` (each < 2**bits) along the last dim, whose length must be a whole
    number of units; returns uint8 ``[..., n * bits / 8]``."""
    per_unit, bytes_per_unit = unit(bits)
    if bits == 8:
        return codes
    *lead, n = codes.shape
    if n % per_unit:
        raise ValueError(f"the last dim ({n}) must be a multiple of {per_unit} to pack {bits}-bit codes")
    # A one-byte unit is packed in uint8; the 3-bit unit (24 bits) needs a wider word.
    work = torch.uint8 if bytes_per_unit == 1 else torch.int32
    c = codes.reshape(*lead, n // per_unit, per_unit).to(work)
    word = c[..., 0].clone()
    for i in range(1, per_unit):
        word |= c[..., i] << (bits * i)
    if bytes_per_unit == 1:
        return word
    out = torch.stack([(word >> (8 * j)) & 0xFF for j in range(bytes_per_unit)], dim=-1).to(torch.uint8)
    return out.reshape(*lead, n // per_unit * bytes_per_unit)


def unpack_bits(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """The inverse of :func:`pack_bits`: uint8 codes ``[..., n]``."""
    per_unit, bytes_per_unit = unit(bits)
    if bits == 8:
        return packed
    *lead, m = packed.shape
    mask = (1 << bits) - 1
    if bytes_per_unit == 1:
        word = packed
    else:
        p = packed.reshape(*lead, m // bytes_per_unit, bytes_per_unit).to(torch.int32)
        word = p[..., 0].clone()
        for j in range(1, bytes_per_unit):
            word |= p[..., j] << (8 * j)
    codes = torch.stack([(word >> (bits * i)) & mask for i in range(per_unit)], dim=-1)
    return codes.to(torch.uint8).reshape(*lead, m // bytes_per_unit * per_unit)
