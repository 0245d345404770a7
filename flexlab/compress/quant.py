"""Group-wise min/max quantization: a config, a container, and two pure functions.

A tensor is cut into groups of ``group_size`` consecutive elements along ``group_dim``; each group
gets its own scale (and zero point, unless symmetric), and each element becomes a ``bits``-bit
code, really bit-packed (3-bit codes take 3 bits). With 4 bits, group 64 and float16 scale and
zero, that is 4 + 32/64 = 4.5 bits per element.

    >>> import torch
    >>> from flexlab.compress import QuantConfig, quantize, dequantize
    >>> x = torch.randn(256, 128)
    >>> q = quantize(x, QuantConfig(bits=4, group_size=64))
    >>> q.bits_per_element
    4.5
    >>> bool(((dequantize(q) - x).abs() <= q.max_error() * 1.001 + 1e-6).all())
    True

Round trip: every element comes back within half a quantization step of its group. The scale
and zero are rounded *outward* to their storage dtype (zero down, scale up), so the stored grid
still covers the group and the bound holds after that rounding too. Constant groups and zeros
are exact; a dimension that is not a multiple of the group size is padded with its last element
(inside the last group's range, so padding never widens a group).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

import torch

from flexlab.compress.packing import SUPPORTED_BITS, pack_bits, unit, unpack_bits
from flexlab.errors import FlexlabError, fields_of

SCALE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


class QuantError(FlexlabError):
    """An invalid quantization setting, or data it cannot represent."""


@dataclass(frozen=True, kw_only=True)
class QuantConfig:
    """How to quantize.

    Attributes:
        bits: code width, one of 2, 3, 4, 8.
        group_size: elements sharing one scale (and zero point).
        group_dim: the dimension groups run along (-1: the last; for a ``Linear`` weight
            ``[out, in]`` that is the input features). Ignored for the KV cache, whose layout
            :class:`CacheQuantConfig` decides.
        symmetric: scale only, codes centred on zero (one level fewer, no zero point stored).
        scale_dtype: storage dtype of scales and zero points.
    """

    bits: int = 4
    group_size: int = 64
    group_dim: int = -1
    symmetric: bool = False
    scale_dtype: torch.dtype = torch.float16

    def __post_init__(self) -> None:
        if self.bits not in SUPPORTED_BITS or isinstance(self.bits, bool):
            raise QuantError(f"QuantConfig.bits={self.bits!r} is invalid; use one of {SUPPORTED_BITS}")
        for name in ("group_size", "group_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise QuantError(f"QuantConfig.{name}={value!r} is invalid; it must be an int")
        if self.group_size < 1:
            raise QuantError(f"QuantConfig.group_size={self.group_size} is invalid; it must be >= 1 (FlexGen used 64)")
        if not isinstance(self.symmetric, bool):
            raise QuantError(f"QuantConfig.symmetric={self.symmetric!r} is invalid; it must be True or False")
        if self.scale_dtype not in SCALE_DTYPES:
            raise QuantError(f"QuantConfig.scale_dtype={self.scale_dtype!r} is invalid; use one of {SCALE_DTYPES}")

    @property
    def levels(self) -> int:
        """Distinct values a group can take."""
        return 2**self.bits - 1 if self.symmetric else 2**self.bits

    def replace(self, **changes) -> QuantConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        """Plain JSON-able values (the scale dtype by name)."""
        d = dataclasses.asdict(self)
        d["scale_dtype"] = str(self.scale_dtype).removeprefix("torch.")
        return d

    @classmethod
    def from_dict(cls, d: dict) -> QuantConfig:
        """A QuantConfig from :meth:`to_dict`'s values (or a hand-written JSON object of fields)."""
        if cls is QuantConfig:  # files written before CacheQuantConfig carry its fields at their defaults
            d = {k: v for k, v in d.items() if (k, v) not in (("kv_layout", "per-token"), ("window", 0))}
        d = fields_of(cls, d, QuantError, f"a {cls.__name__}", '{"bits": 4, "group_size": 64}')
        if "scale_dtype" in d:
            name = d["scale_dtype"]
            d["scale_dtype"] = getattr(torch, name, None) if isinstance(name, str) else name
        return cls(**d)

    @classmethod
    def parse(cls, text: str) -> QuantConfig:
        """``"4"`` or ``"4:64"`` (bits, group size), for command lines."""
        parts = text.split(":")
        if len(parts) > 2:
            raise QuantError(
                f"{text!r} has a KV layout, which applies to the KV cache only; weights take BITS[:GROUP], e.g. 4:64"
            )
        return cls(**_parse_numbers(text, parts))

    def describe(self) -> str:
        return f"{self.bits}-bit g{self.group_size}" + (" sym" if self.symmetric else "")

    def part_nbytes(self, shape: tuple[int, ...]) -> list[int]:
        """Bytes of each tensor :func:`quantize` stores for ``shape`` (codes, scale, zero point),
        padding included, without quantizing anything: what a cost model needs."""
        if not shape:
            raise QuantError("nbytes needs a shape with at least one dimension")
        n = shape[self.group_dim % len(shape)]
        groups = (torch.Size(shape).numel() // n if n else 0) * -(-n // self.group_size)
        per_unit, bytes_per_unit = unit(self.bits)
        meta = groups * self.scale_dtype.itemsize
        return [groups * -(-self.group_size // per_unit) * bytes_per_unit] + [meta] * (1 if self.symmetric else 2)

    def nbytes(self, shape: tuple[int, ...]) -> int:
        """Total bytes :func:`quantize` stores for ``shape``."""
        return sum(self.part_nbytes(shape))

    def bits_per_element(self) -> float:
        """Storage cost per element for whole groups (codes plus scale and zero point)."""
        per_unit, bytes_per_unit = unit(self.bits)
        codes = -(-self.group_size // per_unit) * bytes_per_unit * 8
        meta = (1 if self.symmetric else 2) * torch.empty((), dtype=self.scale_dtype).element_size() * 8
        return (codes + meta) / self.group_size


def _parse_numbers(text: str, parts: list[str]) -> dict:
    try:
        kw = {"bits": int(parts[0])}
        if len(parts) > 1:
            kw["group_size"] = int(parts[1])
    except ValueError:
        raise QuantError(f"{text!r} is not BITS[:GROUP[:LAYOUT]], e.g. 4:64 or 2:32:per-channel") from None
    return kw


@dataclass(frozen=True, kw_only=True)
class CacheQuantConfig(QuantConfig):
    """How to quantize the KV cache: a :class:`QuantConfig` and the two settings only a cache has.

    Attributes:
        kv_layout: ``"per-token"``: each token's keys and values are grouped along the hidden
            dimension (FlexGen). ``"per-channel"``: keys are grouped along the tokens, one group of
            ``group_size`` tokens per channel (KIVI); values stay per-token.
        window: the most recent tokens kept in full precision (with ``"per-channel"`` keys, the
            tokens of a group not yet complete are kept too).
    """

    kv_layout: Literal["per-token", "per-channel"] = "per-token"
    window: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.window, int) or isinstance(self.window, bool) or self.window < 0:
            raise QuantError(f"CacheQuantConfig.window={self.window!r} is invalid; it must be an int >= 0 (0: none)")
        if self.kv_layout not in ("per-token", "per-channel"):
            raise QuantError(
                f"CacheQuantConfig.kv_layout={self.kv_layout!r} is invalid; use 'per-token' or 'per-channel'"
            )

    @classmethod
    def of(cls, config: QuantConfig, **changes) -> CacheQuantConfig:
        """``config``'s settings (a weight config or a cache one) for the cache, with ``changes``."""
        fields = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
        return cls(**{**fields, **changes})

    @classmethod
    def parse(cls, text: str) -> CacheQuantConfig:
        """``"4"``, ``"4:64"`` or ``"2:32:per-channel"`` (bits, group size, KV layout), for command lines."""
        parts = text.split(":")
        kw = _parse_numbers(text, parts)
        if len(parts) > 2:
            kw["kv_layout"] = ":".join(parts[2:])
        return cls(**kw)

    def describe(self) -> str:
        extra = "" if self.kv_layout == "per-token" else " per-channel keys"
        return super().describe() + extra + (f" window {self.window}" if self.window else "")


@dataclass
class QTensor:
    """A quantized tensor: packed codes, per-group scale and zero point, original shape and dtype.

    Layout: ``group_dim`` is moved last and cut into groups, so ``codes`` is uint8
    ``[..., groups, packed bytes per group]`` and ``scale``/``zero`` are ``[..., groups]``.
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None
    config: QuantConfig
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    @property
    def numel(self) -> int:
        return torch.Size(self.shape).numel()

    @property
    def bits_per_element(self) -> float:
        return 8 * self.nbytes / max(self.numel, 1)

    @property
    def device(self) -> torch.device:
        return self.codes.device

    def tensors(self) -> list[torch.Tensor]:
        """The stored tensors, in a fixed order (see :meth:`with_tensors`)."""
        return [self.codes, self.scale] + ([] if self.zero is None else [self.zero])

    def with_tensors(self, tensors: list[torch.Tensor]) -> QTensor:
        """The same quantized tensor with its stored tensors replaced (moved, read from disk)."""
        zero = tensors[2] if self.zero is not None else None
        return dataclasses.replace(self, codes=tensors[0], scale=tensors[1], zero=zero)

    def rows(self, index: torch.Tensor) -> QTensor:
        """Rows ``index`` of a 2-D tensor quantized along its columns (an embedding table): only
        those rows' codes and scales, so a lookup dequantizes a few rows, not the table."""
        if len(self.shape) != 2 or self.config.group_dim % 2 != 1:
            raise QuantError("rows() needs a 2-D tensor grouped along its last dimension")
        return dataclasses.replace(
            self,
            codes=self.codes[index],
            scale=self.scale[index],
            zero=None if self.zero is None else self.zero[index],
            shape=(len(index), self.shape[1]),
        )

    def to(self, device, non_blocking: bool = False) -> QTensor:
        return self.with_tensors([t.to(device, non_blocking=non_blocking) for t in self.tensors()])

    def max_error(self) -> torch.Tensor:
        """Half a quantization step for every element, in the original shape (for checks)."""
        half = 0.5 * self.scale.float().unsqueeze(-1).expand(*self.scale.shape, self.config.group_size)
        return _from_groups(half, self.shape, self.config.group_dim)


def _round_toward(x: torch.Tensor, dtype: torch.dtype, down: bool) -> torch.Tensor:
    """``x`` (float32) in ``dtype``, rounded down (``down``) or up instead of to nearest."""
    y = x.to(dtype)
    wrong = y.float() > x if down else y.float() < x
    target = torch.full_like(y, float("-inf") if down else float("inf"))
    return torch.where(wrong, torch.nextafter(y, target), y)


def _to_groups(x: torch.Tensor, group_size: int, group_dim: int) -> torch.Tensor:
    """``x`` as float32 ``[..., groups, group_size]`` with ``group_dim`` moved last, padded."""
    xt = x.movedim(group_dim, -1).float()
    pad = (-xt.shape[-1]) % group_size
    if pad:  # repeat the last element: it lies inside the last group's range
        xt = torch.cat([xt, xt[..., -1:].expand(*xt.shape[:-1], pad)], dim=-1)
    return xt.reshape(*xt.shape[:-1], xt.shape[-1] // group_size, group_size)


def _from_groups(g: torch.Tensor, shape: tuple[int, ...], group_dim: int) -> torch.Tensor:
    dim = group_dim % len(shape)
    flat = g.reshape(*g.shape[:-2], g.shape[-2] * g.shape[-1])[..., : shape[dim]]
    return flat.movedim(-1, dim)


def _check_finite(extremes: torch.Tensor) -> None:
    if extremes.numel() and not torch.isfinite(extremes).all():
        raise QuantError("quantize got NaN or inf values; they cannot be quantized")


CHUNK_ELEMENTS = 4 << 20  # quantize works through a large tensor this many elements at a time


def quantize(x: torch.Tensor, config: QuantConfig) -> QTensor:
    """Quantize ``x`` (float16, bfloat16 or float32, at least 1-D) group-wise.

    A tensor grouped along any dimension but its first is quantized in slices of its first
    dimension of about :data:`CHUNK_ELEMENTS` (groups never cross them, so the result is the
    same): the float32 temporaries stay that small, not several bytes per element of the whole
    tensor (a 128k-token embedding table: gigabytes).
    """
    if not x.is_floating_point() or x.ndim == 0:
        raise QuantError(
            f"quantize needs a floating-point tensor with at least one dimension, got "
            f"{x.dtype} with shape {tuple(x.shape)}"
        )
    if not -x.ndim <= config.group_dim < x.ndim:
        raise QuantError(f"QuantConfig.group_dim={config.group_dim} is out of range for a {x.ndim}-D tensor")
    rows = _slice_rows(tuple(x.shape), config)
    if rows >= len(x):
        return _quantize(x, config)
    out: list[torch.Tensor] = []  # codes, scale (and zero), allocated whole once the first slice shows their shapes
    for i in range(0, len(x), rows):
        part = _quantize(x[i : i + rows], config).tensors()
        out = out or [t.new_empty((len(x), *t.shape[1:])) for t in part]
        for whole, t in zip(out, part):
            whole[i : i + rows] = t
    return QTensor(out[0], out[1], out[2] if len(out) > 2 else None, config, tuple(x.shape), x.dtype)


def _slice_rows(shape: tuple[int, ...], config: QuantConfig) -> int:
    """How many of the first dimension's rows :func:`quantize` takes at once (all: no slicing)."""
    if len(shape) == 1 or config.group_dim % len(shape) == 0:
        return shape[0]
    return max(1, CHUNK_ELEMENTS // max(1, torch.Size(shape[1:]).numel()))


def quantize_workspace(shape: tuple[int, ...], config: QuantConfig) -> int:
    """Bytes of temporaries :func:`quantize` holds at once for a tensor of ``shape``, besides its
    input and its output: 9 per element of a slice (the float32 groups, their shifted and scaled
    copy, the codes before packing)."""
    rows = min(_slice_rows(shape, config), shape[0])
    return 9 * rows * torch.Size(shape[1:]).numel()


def _quantize(x: torch.Tensor, config: QuantConfig) -> QTensor:
    g = _to_groups(x, config.group_size, config.group_dim)
    sd = config.scale_dtype
    tiny = torch.finfo(sd).tiny  # a constant group gets this scale instead of zero: no division by zero
    # NaN and inf show in the groups' extremes: checking those is far cheaper than every element.
    # The first operation on g makes a new tensor (g may be a view of x); the rest work in place.
    if config.symmetric:
        half = 2 ** (config.bits - 1) - 1
        amax = g.abs().amax(-1)
        _check_finite(amax)
        scale = _round_toward(torch.clamp(amax / half, min=tiny), sd, down=False)
        zero = None
        codes = torch.div(g, scale.float().unsqueeze(-1)).round_().clamp_(-half, half).add_(half)
    else:
        lo, hi = g.amin(-1), g.amax(-1)
        _check_finite(lo)
        _check_finite(hi)
        zero = _round_toward(lo, sd, down=True)
        scale = _round_toward(torch.clamp((hi - zero.float()) / (config.levels - 1), min=tiny), sd, down=False)
        codes = (
            torch.sub(g, zero.float().unsqueeze(-1))
            .div_(scale.float().unsqueeze(-1))
            .round_()
            .clamp_(0, config.levels - 1)
        )
    if not torch.isfinite(scale).all() or (zero is not None and not torch.isfinite(zero).all()):
        raise QuantError(
            f"values up to {float(x.abs().max()):.3g} overflow the scale dtype {sd}; "
            "use QuantConfig(scale_dtype=torch.float32)"
        )
    per_unit = unit(config.bits)[0]
    codes = codes.to(torch.uint8)
    pad = (-config.group_size) % per_unit
    if pad:  # whole packing units per group, so each group's codes start on a byte
        codes = torch.nn.functional.pad(codes, (0, pad))
    return QTensor(pack_bits(codes, config.bits), scale, zero, config, tuple(x.shape), x.dtype)


def dequantize(q: QTensor, dtype: torch.dtype | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """The tensor ``q`` stands for, on ``q``'s device, in ``dtype`` (default: the original);
    written into ``out`` (contiguous, of ``q``'s shape and that dtype) where one is given.

    Works through the groups in chunks of about 4M elements with in-place float32 arithmetic:
    the temporaries stay small, which made a 38M-element embedding table 3x faster on a CPU.
    """
    cfg = q.config
    codes = q.codes.reshape(-1, q.codes.shape[-1])  # [groups, packed bytes]
    scale = q.scale.reshape(-1, 1)
    zero = None if q.zero is None else q.zero.reshape(-1, 1)
    if out is not None:
        assert out.shape == q.shape and out.is_contiguous(), "dequantize's out must be contiguous, of q's shape"
    # groups along the last dimension, none padded: the groups are ``out`` itself, viewed
    direct = out is not None and cfg.group_dim % len(q.shape) == len(q.shape) - 1 and q.shape[-1] % cfg.group_size == 0
    groups = (
        out.view(-1, cfg.group_size)
        if out is not None and direct
        else torch.empty((codes.shape[0], cfg.group_size), dtype=dtype or q.dtype, device=codes.device)
    )
    step = max(1, (4 << 20) // cfg.group_size)
    for i in range(0, codes.shape[0], step):
        v = unpack_bits(codes[i : i + step], cfg.bits)[:, : cfg.group_size].to(torch.float32)
        if cfg.symmetric:
            v.sub_(2 ** (cfg.bits - 1) - 1).mul_(scale[i : i + step].float())
        else:
            assert zero is not None, "an asymmetric QTensor without zero points"
            v.mul_(scale[i : i + step].float()).add_(zero[i : i + step].float())
        groups[i : i + step] = v
    result = _from_groups(groups.view(*q.scale.shape, cfg.group_size), q.shape, cfg.group_dim)
    if out is None:
        return result.contiguous()
    return out if direct else out.copy_(result)
