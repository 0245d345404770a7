"""How a layer's keys or values are stored: fixed-size rows, plus a full-precision tail.

The cache store moves *rows* of a fixed byte size and never looks inside them. Uncompressed, a
row is one token's ``[heads, head_dim]`` in the compute dtype. Compressed, a row is one *chunk*
quantized and flattened to bytes (packed codes, then scales, then zero points):

* per-token (FlexGen): a chunk is one token, grouped along its hidden dimension;
* per-channel keys (KIVI): a chunk is ``group_size`` tokens, each channel grouped along them.

Tokens that do not yet fill a chunk, and the ``window`` most recent tokens, are the *tail*: they
stay in full precision on the compute device until they leave it. For a sequence of ``n``
tokens, :meth:`KVCodec.stored_tokens` says how many are in rows; the rest are the tail.

    >>> import torch
    >>> from flexlab.compress import CacheQuantConfig
    >>> codec = KVCodec(CacheQuantConfig(bits=4, group_size=8, kv_layout="per-channel"), 2, 8,
    ...                 torch.float32, keys=True)
    >>> codec.chunk, codec.stored_tokens(21)       # two whole chunks of 8 tokens; 5 in the tail
    (8, 16)
    >>> x = torch.randn(3, 16, 2, 8)               # [batch, tokens, heads, head_dim]
    >>> rows = codec.encode(x)                     # [batch, chunks, bytes per chunk]
    >>> rows.shape, codec.decode(rows).shape
    (torch.Size([3, 2, 128]), torch.Size([3, 16, 2, 8]))
"""

from __future__ import annotations

from functools import cached_property

import torch

from flexlab.compress import CacheQuantConfig, QTensor, dequantize, quantize


class KVCodec:
    """Rows for one of keys/values of every layer (they share shapes and settings)."""

    def __init__(
        self, config: CacheQuantConfig | None, num_heads: int, head_dim: int, dtype: torch.dtype, *, keys: bool
    ) -> None:
        self.config, self.dtype = config, dtype
        self.heads, self.head_dim = num_heads, head_dim
        per_channel = config is not None and keys and config.kv_layout == "per-channel"
        self.chunk = config.group_size if config is not None and per_channel else 1
        self.window = config.window if config is not None else 0
        self.row_shape: tuple[int, ...] = (num_heads, head_dim)
        self.row_dtype = dtype
        if config is None:
            return
        # A chunk is quantized as [..., chunk, hidden]: along the tokens (dim 2) per channel, or
        # along the hidden dimension per token. Its stored size is known from the shape alone
        # (the cost model builds codecs by the hundred and never encodes).
        self._qcfg = config.replace(group_dim=2 if per_channel else -1)
        self.row_shape, self.row_dtype = (self._qcfg.nbytes(self._chunk_shape(1, 1)),), torch.uint8

    def _chunk_shape(self, b: int, r: int) -> tuple[int, int, int, int]:
        return (b, r, self.chunk, self.heads * self.head_dim)

    @cached_property
    def _template(self) -> QTensor:
        """A quantized dummy chunk: the byte layout (dtype, shape, size) of each part of a row."""
        return quantize(torch.zeros(self._chunk_shape(1, 1)), self._qcfg)

    @cached_property
    def _parts(self) -> list[tuple[torch.dtype, tuple[int, ...], int]]:
        parts = [(t.dtype, tuple(t.shape[2:]), t[0, 0].numel() * t.element_size()) for t in self._template.tensors()]
        assert sum(size for _, _, size in parts) == self.row_bytes, "QuantConfig.part_nbytes disagrees with quantize"
        return parts

    @cached_property
    def row_bytes(self) -> int:  # cached: the cost model asks for it ~10^6 times in a pipeline search
        return torch.Size(self.row_shape).numel() * self.row_dtype.itemsize

    @property
    def max_tail(self) -> int:
        """The most tokens the tail ever holds."""
        return self.chunk - 1 + self.window if self.config is not None else 0

    def stored_tokens(self, n: int) -> int:
        """How many of a sequence's first ``n`` tokens live in rows (the rest in the tail)."""
        if self.config is None:
            return n
        return max(0, n - self.window) // self.chunk * self.chunk

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` ``[b, n, heads, head_dim]`` (``n`` a multiple of the chunk) as rows ``[b, n / chunk, ...]``."""
        if self.config is None:
            return x
        b, n = x.shape[:2]
        q = quantize(x.reshape(self._chunk_shape(b, n // self.chunk)), self._qcfg)
        return torch.cat([t.reshape(b, n // self.chunk, -1).view(torch.uint8) for t in q.tensors()], dim=-1)

    def decode(self, rows: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Rows ``[b, r, ...]`` back to ``[b, r * chunk, heads, head_dim]`` in ``dtype`` (default:
        the compute dtype)."""
        if self.config is None:
            return rows
        b, r = rows.shape[:2]
        tensors, start = [], 0
        for part_dtype, shape, size in self._parts:
            part = rows[..., start : start + size].contiguous().view(part_dtype)
            tensors.append(part.reshape(b, r, *shape))
            start += size
        q: QTensor = self._template.with_tensors(tensors)
        q.shape = self._chunk_shape(b, r)
        return dequantize(q, dtype or self.dtype).reshape(b, r * self.chunk, self.heads, self.head_dim)
