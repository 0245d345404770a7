"""The placement policy: FlexGen's vocabulary, one frozen keyword-only dataclass, validated.

Shares are percentages; whatever the gpu and cpu shares leave goes to disk. ``Policy()`` puts
everything on the gpu tier (the compute device), which makes the engine the reference path.

    >>> from flexlab.engine.policy import Policy
    >>> p = Policy.from_percent([20, 30, 100, 0, 100, 0], gpu_batch_size=4, num_gpu_batches=2)
    >>> p.w_disk_percent, p.block_size
    (50.0, 8)
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flexlab.compress import CacheQuantConfig, QuantConfig
from flexlab.errors import FlexlabError, fields_of

# FlexGen's ``--percent wg wc cg cc hg hc``, in its order: the six shares of a policy.
PERCENT_FIELDS = (
    "w_gpu_percent",
    "w_cpu_percent",
    "cache_gpu_percent",
    "cache_cpu_percent",
    "act_gpu_percent",
    "act_cpu_percent",
)


class PolicyError(FlexlabError):
    """An invalid policy field."""


@dataclass(frozen=True, kw_only=True)
class Policy:
    """Where weights, KV cache and activations live, and how sequences are blocked.

    Attributes:
        gpu_batch_size: sequences computed together in one kernel call.
        num_gpu_batches: GPU batches per block; one load of a layer's weights serves the block.
        w_gpu_percent, w_cpu_percent: share of each layer's weights on the gpu / cpu tier.
        cache_gpu_percent, cache_cpu_percent: share of the block's sequences whose KV cache
            lives on the gpu / cpu tier.
        act_gpu_percent, act_cpu_percent: where the hidden states between layers live; one
            tier only (100/0: gpu, 0/100: cpu, 0/0: disk).
        overlap: prefetch the next layer's weights and the next batch's cache and activations
            while the current batch computes (False: every transfer completes before compute).
        sep_layer: schedule attention and MLP as separate layers (finer weight prefetch).
        pin_weight: keep cpu-tier weights in pinned memory (CUDA only; faster host→GPU copies).
        cpu_cache_compute: run decode attention over cpu-tier cache on the CPU.
        attn_sparsity: fraction of attention weights kept in decode (1.0: dense).
        compress_weight: a ``QuantConfig`` for every weight matrix (vectors stay exact), or None.
        compress_cache: a ``CacheQuantConfig`` for the KV cache (a plain ``QuantConfig`` is taken
            as one with the default layout and no window), or None.
    """

    gpu_batch_size: int = 1
    num_gpu_batches: int = 1
    w_gpu_percent: float = 100
    w_cpu_percent: float = 0
    cache_gpu_percent: float = 100
    cache_cpu_percent: float = 0
    act_gpu_percent: float = 100
    act_cpu_percent: float = 0
    overlap: bool = True
    sep_layer: bool = True
    pin_weight: bool = True
    cpu_cache_compute: bool = False
    attn_sparsity: float = 1.0
    compress_weight: QuantConfig | None = None
    compress_cache: CacheQuantConfig | None = None

    def __post_init__(self) -> None:
        for name in ("gpu_batch_size", "num_gpu_batches"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise PolicyError(f"Policy.{name}={value!r} is invalid; it must be an int >= 1")
        for what in ("w", "cache", "act"):
            gpu, cpu = getattr(self, f"{what}_gpu_percent"), getattr(self, f"{what}_cpu_percent")
            for name, value in ((f"{what}_gpu_percent", gpu), (f"{what}_cpu_percent", cpu)):
                if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value <= 100:
                    raise PolicyError(f"Policy.{name}={value!r} is invalid; shares are percentages in [0, 100]")
            if gpu + cpu > 100 + 1e-9:
                raise PolicyError(
                    f"Policy.{what}_gpu_percent + {what}_cpu_percent = {gpu} + {cpu} > 100; "
                    f"the shares must sum to at most 100 (disk takes the rest)"
                )
        if (self.act_gpu_percent, self.act_cpu_percent) not in ((100, 0), (0, 100), (0, 0)):
            raise PolicyError(
                f"Policy.act_gpu_percent/act_cpu_percent = {self.act_gpu_percent}/{self.act_cpu_percent} splits "
                "activations across tiers; a batch's hidden state is a few MB and is needed whole by the next "
                "layer, so splitting buys nothing: use 100/0 (gpu), 0/100 (cpu) or 0/0 (disk)"
            )
        if not isinstance(self.attn_sparsity, (int, float)) or not 0 < self.attn_sparsity <= 1:
            raise PolicyError(
                f"Policy.attn_sparsity={self.attn_sparsity!r} is invalid; it must be in (0, 1] "
                "(1.0 means dense attention)"
            )
        for name in ("overlap", "sep_layer", "pin_weight", "cpu_cache_compute"):
            if not isinstance(getattr(self, name), bool):
                raise PolicyError(f"Policy.{name}={getattr(self, name)!r} is invalid; it must be True or False")
        for name in ("compress_weight", "compress_cache"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, QuantConfig):
                raise PolicyError(
                    f"Policy.{name}={value!r} is invalid; pass a flexlab.QuantConfig(bits=..., group_size=...) or None"
                )
        if isinstance(self.compress_weight, CacheQuantConfig):
            raise PolicyError(
                f"Policy.compress_weight={self.compress_weight!r} is a CacheQuantConfig, whose kv_layout and "
                "window apply to the KV cache only; pass a QuantConfig, or set it as compress_cache"
            )
        if self.compress_cache is not None and not isinstance(self.compress_cache, CacheQuantConfig):
            object.__setattr__(self, "compress_cache", CacheQuantConfig.of(self.compress_cache))

    # ---- derived shares ---------------------------------------------------------------
    @property
    def w_disk_percent(self) -> float:
        return 100.0 - self.w_gpu_percent - self.w_cpu_percent

    @property
    def cache_disk_percent(self) -> float:
        return 100.0 - self.cache_gpu_percent - self.cache_cpu_percent

    @property
    def act_tier(self) -> str:
        """The one tier activations live on: "gpu", "cpu" or "disk"."""
        return "gpu" if self.act_gpu_percent == 100 else "cpu" if self.act_cpu_percent == 100 else "disk"

    @property
    def percent(self) -> list[float]:
        """The six shares in FlexGen's ``--percent`` order (:data:`PERCENT_FIELDS`)."""
        return [getattr(self, name) for name in PERCENT_FIELDS]

    @property
    def block_size(self) -> int:
        """Sequences per block: ``gpu_batch_size × num_gpu_batches``."""
        return self.gpu_batch_size * self.num_gpu_batches

    @classmethod
    def from_percent(cls, percent: list[float], **kwargs) -> Policy:
        """FlexGen's ``--percent wg wc cg cc hg hc`` six numbers, plus any other field."""
        if len(percent) != 6:
            raise PolicyError(
                f"from_percent takes six numbers (w_gpu, w_cpu, cache_gpu, cache_cpu, act_gpu, "
                f"act_cpu), got {len(percent)}: {percent!r}"
            )
        shares: dict[str, Any] = dict(zip(PERCENT_FIELDS, percent))
        return cls(**shares, **kwargs)

    def replace(self, **changes) -> Policy:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        """Plain JSON-able values; :meth:`from_dict` reads them back."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for name in ("compress_weight", "compress_cache"):
            d[name] = d[name].to_dict() if d[name] is not None else None
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Policy:
        """A Policy from :meth:`to_dict`'s values (or a hand-written JSON object of fields)."""
        d = fields_of(
            cls, d, PolicyError, "a policy", '{"w_gpu_percent": 20, "w_cpu_percent": 30, "gpu_batch_size": 8}'
        )
        for name, kind in (("compress_weight", QuantConfig), ("compress_cache", CacheQuantConfig)):
            if isinstance(d.get(name), dict):
                d[name] = kind.from_dict(d[name])
        return cls(**d)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Policy:
        """A Policy from a JSON file (as ``flexlab search --save-policy`` writes it); a file that
        cannot be read or parsed, or whose fields are invalid, raises PolicyError saying which."""
        try:
            data = json.loads(Path(path).expanduser().read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise PolicyError(f"cannot read a JSON policy ({e})") from None
        try:
            return cls.from_dict(data)
        except (TypeError, ValueError) as e:
            raise PolicyError(str(e)) from None

    def describe(self) -> str:
        """One line in FlexGen's notation."""

        def pct(x: float) -> str:  # 100 - 92.6 - 7.4 is 5e-15, not a share worth printing
            return f"{round(x, 2) + 0.0:g}"

        return (
            f"w {pct(self.w_gpu_percent)}/{pct(self.w_cpu_percent)}/{pct(self.w_disk_percent)} "
            f"cache {pct(self.cache_gpu_percent)}/{pct(self.cache_cpu_percent)}/{pct(self.cache_disk_percent)} "
            f"act {self.act_tier}, batch {self.gpu_batch_size}x{self.num_gpu_batches}, "
            f"overlap {'on' if self.overlap else 'off'}"
            + (f", weights {self.compress_weight.describe()}" if self.compress_weight else "")
            + (f", cache {self.compress_cache.describe()}" if self.compress_cache else "")
            + (", attention of cpu rows on the cpu" if self.cpu_cache_compute else "")
            + (f", attention sparsity {self.attn_sparsity:g}" if self.attn_sparsity < 1 else "")
            + ("" if self.sep_layer else ", attention and MLP as one stage")
            + ("" if self.pin_weight else ", weights not pinned")
        )

    def _repr_html_(self) -> str:
        cell = "<td style='text-align:right'>{:g}%</td>"
        rows = "".join(
            f"<tr><th>{what}</th>" + cell.format(g) + cell.format(c) + cell.format(100 - g - c) + "</tr>"
            for what, g, c in (
                ("weights", self.w_gpu_percent, self.w_cpu_percent),
                ("KV cache", self.cache_gpu_percent, self.cache_cpu_percent),
                ("activations", self.act_gpu_percent, self.act_cpu_percent),
            )
        )
        return (
            f"<table><tr><th></th><th>gpu</th><th>cpu</th><th>disk</th></tr>{rows}</table>"
            f"<small>batch {self.gpu_batch_size} × {self.num_gpu_batches}, overlap={self.overlap}, "
            f"sep_layer={self.sep_layer}, cpu_cache_compute={self.cpu_cache_compute}, "
            f"attn_sparsity={self.attn_sparsity}</small>"
        )
