"""What a machine can do, as the cost model needs it: measured by ``calibrate()`` or a preset.

Every rate is in bytes or FLOPs per second. The "gpu" is the compute device: on a CPU-only
machine it is the CPU, the gpu↔cpu link is free (the same RAM) and ``link_*`` are ``inf``.

    >>> hw = get_hardware("colab-t4")
    >>> hw.gpu_memory / 2**30, hw.source.startswith("published")
    (15.0, True)
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path
from typing import Any

from flexlab.errors import FlexlabError
from flexlab.files import atomic_write

RUNTIME_BASE_CPU = 0.3 * 2**30  # a CPU build of torch, flexlab and a tokenizer (measured here: 0.22-0.29 GiB)
# a CUDA build and its context: calibrate() measured 1.02 GiB on a lent H200 machine (torch 2.11+cu130,
# 2026-12-04); other GPUs' contexts differ, so the presets keep this margin above it
RUNTIME_BASE_CUDA = 1.5 * 2**30


@dataclass(frozen=True, kw_only=True)
class HardwareProfile:
    """Rates and capacities of one machine.

    Attributes:
        name, source: what it is, and where the numbers come from (measured, or published with
            their origin).
        matmul_flops: dense matmul throughput at prefill shapes (large, compute-bound).
        weight_read_bw: bytes/s a decode matmul (few rows) streams weights at (memory-bound).
        attention_bw: bytes/s of KV cache the device attends over in decode.
        cpu_attention_bw: the same, on the CPU (``cpu_cache_compute``).
        link_pinned_bw, link_pageable_bw: host→device copies (inf without a GPU).
        disk_read_bw, disk_write_bw: without the page cache (O_DIRECT).
        dequant_elems: elements per second of weights dequantized on the device (the marginal
            rate: what one more element costs in a large matrix).
        dequant_call_s: fixed cost of dequantizing one matrix (its kernels' launches and
            temporaries; on a GPU an opt-125m-sized matrix costs mostly this). Profiles saved
            before it existed load with 0.
        kv_codec_elems: elements per second of KV cache rows quantized or dequantized.
        kv_codec_call_s: fixed cost of one quantize or dequantize call on a batch's keys or values
            in one layer (on a GPU, launches dominate).
        sparse_call_s, sparse_value_bw: sparse attention's own work beyond dense attention's, per
            batch and layer of a decode step: a fixed cost (choosing the rows, a sync) and the
            kept value rows' bytes at a rate (gathering and weighting them). 0: not measured
            (profiles saved before them; the presets): the gather alone is charged.
        step_overhead_s: fixed cost of one scheduled compute step (Python, kernel launches).
        transfer_overhead_s: fixed cost of a transfer step handed to a lane thread (it competes
            with the compute for the interpreter and the cores).
        cache_transfer_overhead_s: the same for a KV cache load or store (one layer and batch),
            which moves more and costs the cores more than an activation transfer (on a CPU: what
            a disk-cache read or write adds to the compute's busy time, its thread's wake-ups
            stalling the compute's; the disk's own time is charged to the disk lane).
        disk_latency_s: fixed cost of one disk request (each KV cache read and write pays it).
        gpu_memory, cpu_memory, disk_space: capacities in bytes.
        runtime_base_bytes: host RAM a process holds before the engine allocates anything (the
            interpreter, torch, a loaded model's metadata; with CUDA, its libraries and
            context), measured by ``calibrate()`` in a fresh process.
        llc_bytes: a CPU's last-level cache. A stage's weights that fit are read from memory by
            the first of a token's GPU batches only; the next batches find them there (0: never,
            as on a GPU, whose batches each read HBM).
        llc_weight_read_bw: bytes/s a decode matmul reads a weight from that cache (the later
            batches: a few rows' products run far below ``matmul_flops`` even there; 0: not
            measured, those batches are charged their FLOPs alone, as profiles saved before it).
        packed_weight_read_bw, packed_llc_weight_read_bw: ``weight_read_bw`` and
            ``llc_weight_read_bw`` for the matrices a CPU computing in bfloat16 holds packed
            (:func:`~flexlab.models.layers.packed`: its memory tiers'); 0: not packed, or not
            measured (presets, a GPU, profiles saved before it).
        small_dequant_elems: on a CPU, ``dequant_elems`` for matrices of opt-125m's size, whose
            dequantization runs in the cache (2-3x faster here than twice as wide); the model
            interpolates between the two by the model's width. 0: one rate for every size (a
            GPU; profiles saved before it).
        disk_stall_s_per_gb: seconds a stage's compute loses per GB of its weights read from disk
            beside it (the reader's threads take the cores the compute's kernels run on; 0.06-0.24
            s/GB on two cores here). Charged with ``overlap`` only; 0: not measured (the presets).
        convert_elems: on a CPU, elements/s its weight lane converts a checkpoint read in place
            in a narrower dtype into the compute's (float16 into float32) beside a decode; 0:
            not measured (profiles saved before it, a GPU), charged as a copy at
            ``weight_read_bw``.
    """

    name: str
    source: str
    matmul_flops: float
    weight_read_bw: float
    attention_bw: float
    cpu_attention_bw: float
    link_pinned_bw: float
    link_pageable_bw: float
    disk_read_bw: float
    disk_write_bw: float
    dequant_elems: float
    kv_codec_elems: float
    step_overhead_s: float
    transfer_overhead_s: float
    cache_transfer_overhead_s: float
    disk_latency_s: float
    gpu_memory: float
    cpu_memory: float
    disk_space: float
    runtime_base_bytes: float = RUNTIME_BASE_CPU
    dequant_call_s: float = 0.0
    kv_codec_call_s: float = 0.0
    llc_bytes: float = 0.0
    llc_weight_read_bw: float = 0.0
    packed_weight_read_bw: float = 0.0
    packed_llc_weight_read_bw: float = 0.0
    disk_stall_s_per_gb: float = 0.0
    small_dequant_elems: float = 0.0
    sparse_call_s: float = 0.0
    sparse_value_bw: float = 0.0
    convert_elems: float = 0.0

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type == "float" and (
                not isinstance(value, (int, float))
                or math.isnan(value)
                or value < 0
                or (value == 0 and not f.name.endswith("_s") and f.default != 0.0)  # 0: not measured
            ):
                raise FlexlabError(
                    f"HardwareProfile.{f.name}={value!r} is invalid; rates and capacities must be positive numbers"
                )

    @property
    def has_link(self) -> bool:
        """Whether gpu and cpu are separate memories (a real GPU)."""
        return math.isfinite(self.link_pinned_bw)

    def replace(self, **changes) -> HardwareProfile:
        return HardwareProfile(**{**asdict(self), **changes})

    def save(self, path: str | os.PathLike) -> None:
        """Write as JSON, atomically (``inf`` as the string "inf")."""
        data = {k: ("inf" if isinstance(v, float) and math.isinf(v) else v) for k, v in asdict(self).items()}
        atomic_write(path, json.dumps(data, indent=2))

    @classmethod
    def load(cls, path: str | os.PathLike) -> HardwareProfile:
        data = json.loads(Path(path).read_text())
        names = {f.name for f in fields(cls)}
        optional = {f.name for f in fields(cls) if f.default is not MISSING}  # added later: defaults
        if not names - optional <= set(data) <= names:
            missing, unknown = sorted(names - set(data)), sorted(set(data) - names)
            raise FlexlabError(
                f"{path} is not a hardware profile of this flexlab version (missing: {missing or 'none'}; "
                f"unknown: {unknown or 'none'}); measure it again with flexlab.cost.calibrate() or "
                "`flexlab calibrate`"
            )
        values: dict[str, Any] = {k: float(v) if v == "inf" else v for k, v in data.items()}
        return cls(**values)

    def _repr_html_(self) -> str:
        rows = "".join(f"<tr><td>{k}</td><td>{_human(k, v)}</td></tr>" for k, v in asdict(self).items())
        return f"<table>{rows}</table>"


def _human(key: str, value) -> str:
    if not isinstance(value, float) or math.isinf(value):
        return str(value)
    if value == 0 and not key.endswith(("_s", "_bytes", "memory", "space")):  # a rate left at 0: not measured
        return "not measured"
    if key.endswith("_per_gb"):
        return f"{value:.3f} s per GB"
    if key.endswith("_s"):
        return f"{value * 1e6:.0f} µs"
    if key == "matmul_flops":
        return f"{value / 1e12:.2f} TFLOP/s"
    if key.endswith("_elems"):
        return f"{value / 1e9:.2f} G elements/s"
    if key.endswith(("memory", "space", "_bytes")):  # a CPU's last-level cache is MiB
        return f"{value / 2**30:.1f} GiB" if value >= 2**30 or value == 0 else f"{value / 2**20:.0f} MiB"
    return f"{value / 1e9:.2f} GB/s"


GiB = 2**30
INF = float("inf")

# Published figures (vendor data sheets; effective rates ~60-80% of peak as FlexGen's own fits
# found), for machines that cannot be measured from here. Replace them with calibrate() there.
PRESETS: dict[str, HardwareProfile] = {
    "colab-t4": HardwareProfile(
        name="colab-t4",
        source="published: NVIDIA T4 data sheet (65 TFLOP/s fp16 tensor peak, 320 GB/s), "
        "PCIe 3.0 x16 (~12 GB/s pinned), Colab VM disk (~0.2 GB/s); effective rates assumed",
        matmul_flops=25e12,
        weight_read_bw=220e9,
        attention_bw=200e9,
        cpu_attention_bw=8e9,
        link_pinned_bw=11e9,
        link_pageable_bw=5e9,
        disk_read_bw=0.2e9,
        disk_write_bw=0.15e9,
        dequant_elems=40e9,
        kv_codec_elems=25e9,
        step_overhead_s=60e-6,
        transfer_overhead_s=30e-6,
        cache_transfer_overhead_s=60e-6,
        disk_latency_s=1e-3,
        gpu_memory=15 * GiB,
        cpu_memory=12 * GiB,
        disk_space=80 * GiB,
        runtime_base_bytes=RUNTIME_BASE_CUDA,
    ),
    "h100": HardwareProfile(
        name="h100",
        source="published: NVIDIA H100 SXM data sheet (989 TFLOP/s dense fp16, 3.35 TB/s), "
        "PCIe 5.0 (~50 GB/s); disk 1.8 GB/s as dd iflag=direct measured on the lent H100 machine (2026-11-25)",
        matmul_flops=600e12,
        weight_read_bw=2.5e12,
        attention_bw=2.0e12,
        cpu_attention_bw=30e9,
        link_pinned_bw=45e9,
        link_pageable_bw=15e9,
        disk_read_bw=1.8e9,
        disk_write_bw=1.2e9,
        dequant_elems=500e9,
        kv_codec_elems=250e9,
        step_overhead_s=40e-6,
        transfer_overhead_s=20e-6,
        cache_transfer_overhead_s=40e-6,
        disk_latency_s=0.2e-3,
        gpu_memory=78 * GiB,
        cpu_memory=128 * GiB,
        disk_space=60 * GiB,
        runtime_base_bytes=RUNTIME_BASE_CUDA,
    ),
}
# FlexGen's own machine (its paper: a GCP T4 with 208 GB DRAM and a 1.5 TB SSD), with the rates
# FlexGen fitted to its runs there (its experimental/cost_model.py; its GB is 2**30) where a rate
# means the same here: prefill matmuls, decode attention on the GPU and on the CPU (its FLOP
# rates, which equal bytes of fp16 cache read per second), host->device copies, disk reads and
# cache writes. It fitted nothing for compression or step overheads: those are colab-t4's. Its
# device->host cache copies (0.97 GiB/s) and decode matmuls (4.3 TFLOP/s) have no term of
# their own here (see experiments/flexgen_published.py).
PRESETS["flexgen-t4"] = PRESETS["colab-t4"].replace(
    name="flexgen-t4",
    source="FlexGen's paper machine (T4 16 GB, 208 GB DRAM, 1.5 TB SSD) with FlexGen's fitted rates "
    "(experimental/cost_model.py); compression and overheads as colab-t4",
    matmul_flops=21.24e12,
    attention_bw=0.079e12,
    cpu_attention_bw=0.0123e12,
    link_pinned_bw=12.89 * GiB,
    link_pageable_bw=12.89 * GiB,
    disk_read_bw=0.473 * GiB,
    disk_write_bw=0.746 * GiB,
    gpu_memory=15 * GiB,
    cpu_memory=204 * GiB,
    disk_space=1500 * GiB,
)
PRESETS["h200"] = PRESETS["h100"].replace(
    name="h200",
    source="published: NVIDIA H200 data sheet (989 TFLOP/s dense fp16, 4.8 TB/s), PCIe 5.0; "
    "the rest as the H100 machine's",
    weight_read_bw=3.5e12,
    attention_bw=3.0e12,
    dequant_elems=600e9,
    gpu_memory=139 * GiB,
)


def get_hardware(name_or_path: str | os.PathLike) -> HardwareProfile:
    """A preset by name (``colab-t4``, ``flexgen-t4``, ``h100``, ``h200``) or a profile saved as JSON."""
    if isinstance(name_or_path, str) and name_or_path in PRESETS:
        return PRESETS[name_or_path]
    path = Path(name_or_path)
    if path.suffix == ".json" and path.exists():
        return HardwareProfile.load(path)
    raise FlexlabError(
        f"unknown hardware {str(name_or_path)!r}: use one of {sorted(PRESETS)}, a JSON file written "
        "by HardwareProfile.save, or flexlab.cost.calibrate() to measure this machine"
    )
