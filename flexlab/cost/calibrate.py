"""Measure this machine for the cost model: ``calibrate()`` → :class:`HardwareProfile`.

Each rate is timed on the operation the engine itself runs (its matmuls, its attention, its
O_DIRECT reader, its dequantizer and KV codec: :mod:`flexlab.cost.probes`; whole engine runs for
the per-step overheads), taking the median of a few repeats: the model predicts runs on the same
shared machine, which see its typical speed.

    >>> hw = calibrate(quick=True)              # doctest: +SKIP
    >>> hw.save("my-machine.json")              # doctest: +SKIP
"""

from __future__ import annotations

import os
import shutil
import statistics
import tempfile
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch

from flexlab.cost.hardware import RUNTIME_BASE_CPU, RUNTIME_BASE_CUDA, HardwareProfile
from flexlab.cost.probes import (
    CODEC_PROBE_HIDDEN,
    cache_move_cpu_seconds,
    codec_rates,
    convert_rate,
    dequant_rates,
    difference_rate,
    difference_seconds,
    disk_rates,
    llc_weight_read_rate,
    matmul_rate,
    median_seconds,
    reads_rate,
    sparse_rates,
    weight_read_rate,
)
from flexlab.devices import device_and_dtype
from flexlab.models import layers
from flexlab.models.attention import attend


def refresh(
    hw: HardwareProfile,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    offload_dir: str | os.PathLike | None = None,
    reads: Sequence[tuple[Path, int, int]] = (),
) -> HardwareProfile:
    """``hw`` with its most volatile rates re-measured now (matmul and weight reads at quick
    calibration's sizes, weight reads from a CPU's cache, disk read, dequantization, the KV
    codec, a CPU's conversion of a narrower checkpoint; about a second). On a shared machine
    these swing by 2x within minutes (a calibration's matmul probe read 148 GFLOP/s here and 176
    ten minutes later): a prediction compared with a measurement should use rates probed next to
    it.

    ``reads``: time the disk on these reads instead of a file written now: an engine's
    :meth:`~flexlab.engine.Engine.weight_reads` (its own files, of their age, in its request
    sizes; the probe's fresh file read 1.3-2.6 GB/s where the engine's reads saw 1.0-1.8)."""
    device, dtype = device_and_dtype(device, dtype)
    matmul, weight_read = matmul_rate(device, dtype, 1024, 3), weight_read_rate(device, dtype, 1024, 3)
    llc_read = llc_weight_read_rate(device, dtype, 3)
    packs = layers.packs(device, dtype)
    packed_read = weight_read_rate(device, dtype, 1024, 3, packed=True) if packs else 0.0
    packed_llc = llc_weight_read_rate(device, dtype, 3, packed=True) if packs else 0.0
    read, _, latency = disk_rates(Path(offload_dir or tempfile.gettempdir()), 64 << 20, 3, write=False)
    if reads:  # the fresh file still gives the latency of a small read
        read = reads_rate(reads, 3)
    rate, call, small = dequant_rates(device, dtype, 3)
    codec, codec_call = codec_rates(device, dtype, CODEC_PROBE_HIDDEN)
    convert = convert_rate(dtype, 7) if device.type == "cpu" else hw.convert_elems
    return hw.replace(
        matmul_flops=matmul,
        weight_read_bw=weight_read,
        llc_weight_read_bw=llc_read,
        packed_weight_read_bw=packed_read,
        packed_llc_weight_read_bw=packed_llc,
        disk_read_bw=read,
        disk_latency_s=latency,
        dequant_elems=rate,
        dequant_call_s=call,
        small_dequant_elems=small,
        kv_codec_elems=codec,
        kv_codec_call_s=codec_call,
        convert_elems=convert,
    )


def _engine_seconds(
    model, policy, prompts: list[list[int]], new: int, device: torch.device, offload_dir: Path | None = None
) -> float:
    from flexlab.engine import Engine

    with Engine(model, policy, offload_dir=offload_dir) as engine:
        return median_seconds(lambda: engine.generate(prompts, max_new_tokens=new, stop_token_ids=None), 2, device)


def _alternated_seconds(
    model, policies: list, prompts: list[list[int]], new: int, device: torch.device, rounds: int, offload_dir: Path
) -> list[float]:
    """Per policy, the median seconds of a run in a fresh engine (after a warm-up), the policies
    taking turns ``rounds`` times, so that a slow minute of a shared machine falls on all."""
    from flexlab.engine import Engine

    times: list[list[float]] = [[] for _ in policies]
    for _ in range(rounds):
        for policy, timed in zip(policies, times):
            with Engine(model, policy, offload_dir=offload_dir) as engine:
                run = lambda: engine.generate(prompts, max_new_tokens=new, stop_token_ids=None)  # noqa: E731
                timed.append(median_seconds(run, 1, device))
    return [statistics.median(t) for t in times]


def _step_overheads(
    device: torch.device, dtype: torch.dtype, offload_dir: Path, rounds: int = 3
) -> tuple[float, float, float, float]:
    """Seconds per compute step, per transfer step handed to a lane thread, per KV cache load or
    store on a lane, and the compute's seconds lost per GB of weights read from disk beside it.

    The compute step's cost is timed on a model too small for its maths to matter, everything
    resident. A lane's cost is the slowdown when the activations leave the device (every stage
    stores and loads its hidden state on a lane: the cpu tier on a GPU, disk on a CPU, where the
    cpu tier is read in place; a few KB each) on a model with opt-125m-sized layers: on few
    cores a lane thread mostly costs by stalling the compute's parallel kernels, which only
    shows when there is compute to stall. A cache transfer's cost on a GPU is the slowdown when
    the same run's cache goes to the cpu tier, per load and store; on a CPU, what the disk cache
    adds to the compute lane's busy time (:func:`_compute_stalls`), which also gives the stall of
    disk weights.
    """
    from flexlab.engine import Policy
    from flexlab.models.config import get_preset
    from flexlab.models.model import Model

    new, nb = 8, 2
    tiny = Model.from_config("opt-tiny", seed=0, dtype=dtype, device=device)
    prompts = [[2, 5, 6]] * 2 * nb
    resident = _engine_seconds(tiny, Policy(gpu_batch_size=2, num_gpu_batches=nb), prompts, new, device)
    step = resident / ((2 + 2 * tiny.config.num_layers) * nb * new)
    shape = get_preset("opt-125m").replace(name="opt-125m-2layers", num_layers=2)
    model = Model.from_config(shape, seed=0, dtype=dtype, device=device)
    prompts = [[2] + list(range(10, 40))] * 8 * nb
    act_cpu = 100.0 if device.type == "cuda" else 0.0
    # fresh engines in turn, medians: one engine's two runs swung the lane's cost 3x (0.44-1.24 ms)
    fast, lanes = _alternated_seconds(
        model,
        [
            Policy(gpu_batch_size=8, num_gpu_batches=nb),
            Policy.from_percent([100, 0, 100, 0, 0, act_cpu], gpu_batch_size=8, num_gpu_batches=nb),
        ],
        prompts,
        new,
        device,
        rounds,
        offload_dir,
    )
    transfers = nb * new * 2 * (1 + 2 * shape.num_layers)  # a store and a load between stages
    cache_move, stall = _compute_stalls(model, prompts, new, nb, offload_dir, rounds)
    if device.type == "cuda":
        cache_cpu = Policy.from_percent([100, 0, 0, 100, 100, 0], gpu_batch_size=8, num_gpu_batches=nb)
        cache_moves = nb * shape.num_layers * (2 * new - 1)  # a store every token, a load every decode token
        cache_move = difference_seconds(
            cache_moves, _engine_seconds(model, cache_cpu, prompts, new, device), fast, "a cache transfer's cost"
        )
    return step, difference_seconds(transfers, lanes, fast, "a lane transfer's cost"), cache_move, stall


def _compute_busy(model, policy, prompts: list[list[int]], new: int, offload_dir: Path) -> tuple[float, float]:
    """Seconds the compute lane was busy in one run of a fresh engine (after a warm-up), its
    waits for transfers left out; and the bytes of weights the run read. A fresh engine each
    time, as the runs the model predicts: engines kept open and run in turn measured a disk-cache
    move at half the cost (0.35-0.71 against 0.76-1.31 ms, 2026-12-07), and the model then
    predicted the disk-cache rows 25% fast."""
    from flexlab.engine import Engine

    with Engine(model, policy, offload_dir=offload_dir) as engine:
        engine.generate(prompts[: policy.gpu_batch_size], max_new_tokens=2, stop_token_ids=None)
        summary = engine.generate(prompts, max_new_tokens=new, stop_token_ids=None).timeline.summary()
    return summary["compute_busy_s"], summary.get("bytes[load weight]", 0.0)


# Seconds of compute a GB of disk weights can stall: 0.08-0.24 measured on two cores here; a GB
# read at 1-2 GB/s beside the compute cannot take more than the cores' whole time for its read.
MAX_DISK_STALL_S_PER_GB = 1.0


def _compute_stalls(
    model, prompts: list[list[int]], new: int, nb: int, offload_dir: Path, rounds: int = 3
) -> tuple[float, float]:
    """What a disk-cache load or store adds to the compute lane's busy time (seconds), and what
    a GB of weights read from disk does (seconds per GB), from runs with everything resident,
    the cache on disk and half the weights on disk, in alternation (medians of ``rounds`` each). The
    compute's busy time, not the run's: the disk's own time is charged on the disk lane.

    On two cores a lane thread's read costs the compute several times its own CPU time (its
    wake-ups preempt one of the compute's threads, and the other waits at the kernel's end:
    opt-125m's layer norms ran 9x slower beside the disk cache, 2026-12-06). The cores' time
    alone (:func:`~flexlab.cost.probes.cache_move_cpu_seconds`, 0.2 ms) was a fifth of a cache
    move's (1.0-1.2 ms), and the model 34-59% optimistic for a disk cache; it stays the floor
    where the difference is within noise. (An engine difference of wall times, tried before,
    swung 5x: it also held the waits for the disk.) Weights read beside the compute stalled it
    by 0.06-0.24 s per GB, more consistently per byte than per read (2026-12-07); half of them
    on disk, as the searches' mixed placements have them (the whole model on disk is mostly
    its token table's two large reads a token)."""
    from flexlab.engine import Policy

    policies = [
        Policy.from_percent(shares, gpu_batch_size=8, num_gpu_batches=nb)
        for shares in ([100.0, 0, 100, 0, 100, 0], [100.0, 0, 0, 0, 100, 0], [50.0, 0, 100, 0, 100, 0])
    ]
    runs: list[list[tuple[float, float]]] = [[], [], []]
    for _ in range(rounds):
        for policy, timed in zip(policies, runs):
            timed.append(_compute_busy(model, policy, prompts, new, offload_dir))
    resident, cache_on_disk, weights_on_disk = (statistics.median(busy for busy, _ in r) for r in runs)
    moves = nb * model.config.num_layers * (2 * new - 1)  # a store every token, a load every decode token
    rate = difference_rate(moves, cache_on_disk, resident, "a disk-cache transfer's cost")
    floor = cache_move_cpu_seconds(offload_dir, 8, len(prompts[0]) + new, model.config.hidden_size, model.dtype)
    gb_per_s = difference_rate(runs[2][0][1] / 1e9, weights_on_disk, resident, "the stall of disk weights")
    stall = 0.0 if gb_per_s is None else 1 / gb_per_s
    if stall > MAX_DISK_STALL_S_PER_GB:  # a few MB read beside a busy minute: not a rate
        warnings.warn(
            f"calibrate: the stall of disk weights measured {stall:.1f} s per GB, beyond the "
            f"{MAX_DISK_STALL_S_PER_GB} any reader's threads cost; not used (0). Rerun calibrate() on a "
            "quieter machine",
            stacklevel=3,
        )
        stall = 0.0
    return (floor if rate is None else max(floor, 1 / rate)), stall


_BASE_PROBE = """
import sys, torch, flexlab
from flexlab.devices import resident_bytes
model = flexlab.Model.from_config("opt-tiny", seed=0, dtype=getattr(torch, sys.argv[2]), device=sys.argv[1])
with flexlab.Engine(model) as engine:
    result = engine.generate([[2, 5, 6]] * 2, max_new_tokens=4, stop_token_ids=None)
tracked = sum(result.metrics[f"peak_bytes_{t}"] for t in ("gpu", "cpu")) if sys.argv[1] == "cpu" else 0
print(int(resident_bytes(peak=True) - tracked))
"""


def _runtime_base(device: torch.device, dtype: torch.dtype) -> float:
    """Host bytes a fresh process holds once torch and flexlab are loaded and an engine has run
    (its libraries, interpreter, thread pools; with CUDA its context), less what the engine
    tracked: the base that :class:`~flexlab.engine.footprint.Footprint` adds to a run's bytes."""
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-c", _BASE_PROBE, device.type, str(dtype).removeprefix("torch.")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if out.returncode != 0 or not out.stdout.strip().isdigit():
        warnings.warn(
            f"calibrate: the runtime base could not be measured ({out.stderr.strip()[-200:]}); "
            "using the default for this kind of machine",
            stacklevel=3,
        )
        return RUNTIME_BASE_CUDA if device.type == "cuda" else RUNTIME_BASE_CPU
    return float(out.stdout.strip())


def _llc_bytes() -> float:
    """The CPU's largest cache (Linux's sysfs; 0 where it does not say)."""
    sizes = [0.0]
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            text = (index / "size").read_text().strip().upper()
        except OSError:
            continue
        scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        digits = text.rstrip("KMG")
        if digits.isdigit():
            sizes.append(float(int(digits) * scale))
    return max(sizes)


def calibrate(
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    offload_dir: str | os.PathLike | None = None,
    quick: bool = False,
    progress: bool = True,
) -> HardwareProfile:
    """Measure the rates of this machine (``quick``: smaller sizes, a few seconds on a CPU)."""
    from tqdm.auto import tqdm

    device, dtype = device_and_dtype(device, dtype)
    scale = 1 if quick else 2
    h, repeats = 1024 * scale, 5
    results: dict[str, float] = {}
    steps = [
        "matmul",
        "weight read",
        "attention",
        "cpu attention",
        "link",
        "disk",
        "dequantize",
        "conversion",
        "KV codec",
        "sparse attention",
        "step overhead",
        "runtime base",
    ]
    bar = tqdm(steps, desc="calibrating", disable=not progress, leave=False)

    def step(name: str) -> None:
        bar.set_postfix_str(name)
        bar.update(1)

    results["matmul_flops"] = matmul_rate(device, dtype, h, repeats)
    step("matmul")
    results["weight_read_bw"] = weight_read_rate(device, dtype, h, repeats)
    results["llc_weight_read_bw"] = llc_weight_read_rate(device, dtype, repeats)
    if layers.packs(device, dtype):  # the matrices the engine holds in memory, as it holds them
        results["packed_weight_read_bw"] = weight_read_rate(device, dtype, h, repeats, packed=True)
        results["packed_llc_weight_read_bw"] = llc_weight_read_rate(device, dtype, repeats, packed=True)
    step("weight read")
    g = torch.Generator(device="cpu").manual_seed(0)

    def attention_bw(dev: torch.device, dt: torch.dtype) -> float:
        b, heads, length, d = 8, 16, 512 * scale, 64
        q = torch.randn(b, heads, 1, d, generator=g).to(dev, dt)
        k = torch.randn(b, heads, length, d, generator=g).to(dev, dt)
        v = torch.randn(b, heads, length, d, generator=g).to(dev, dt)
        bias = torch.zeros(b, 1, 1, length, device=dev)
        return 2 * k.numel() * k.element_size() / median_seconds(lambda: attend(q, k, v, bias), repeats, dev)

    results["attention_bw"] = attention_bw(device, dtype)
    step("attention")
    cpu_dtype = torch.float32 if dtype == torch.float16 else dtype  # as cpu_cache_compute runs it
    results["cpu_attention_bw"] = (
        attention_bw(torch.device("cpu"), cpu_dtype) if device.type == "cuda" else results["attention_bw"]
    )
    step("cpu attention")
    if device.type == "cuda":
        size = (64 << 20) * scale
        pinned = torch.empty(size, dtype=torch.uint8, pin_memory=True)
        pageable = torch.empty(size, dtype=torch.uint8)
        results["link_pinned_bw"] = size / median_seconds(lambda: pinned.to(device, non_blocking=True), repeats, device)
        results["link_pageable_bw"] = size / median_seconds(lambda: pageable.to(device), repeats, device)
    else:
        results["link_pinned_bw"] = results["link_pageable_bw"] = float("inf")
    step("link")
    directory = Path(offload_dir or tempfile.gettempdir())
    results["disk_read_bw"], results["disk_write_bw"], results["disk_latency_s"] = disk_rates(
        directory, (128 if quick else 512) << 20, repeats
    )
    step("disk")
    results["dequant_elems"], results["dequant_call_s"], results["small_dequant_elems"] = dequant_rates(
        device, dtype, repeats
    )
    step("dequantize")
    results["convert_elems"] = convert_rate(dtype, 2 * repeats) if device.type == "cpu" else 0.0
    step("conversion")
    results["kv_codec_elems"], results["kv_codec_call_s"] = codec_rates(device, dtype, CODEC_PROBE_HIDDEN)
    step("KV codec")
    results["sparse_value_bw"], results["sparse_call_s"] = sparse_rates(device, dtype)
    step("sparse attention")
    (
        results["step_overhead_s"],
        results["transfer_overhead_s"],
        results["cache_transfer_overhead_s"],
        results["disk_stall_s_per_gb"],
    ) = _step_overheads(device, dtype, directory, rounds=2 if quick else 3)
    step("step overhead")
    results["runtime_base_bytes"] = _runtime_base(device, dtype)
    step("runtime base")
    bar.close()
    ram = float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    if device.type == "cuda":
        gpu_memory, cpu_memory = float(torch.cuda.get_device_properties(device).total_memory), ram
    else:  # one RAM for both tiers: half each (the search pools them; counting it twice would not fit)
        gpu_memory = cpu_memory = ram / 2
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({os.cpu_count()} cores)"
    return HardwareProfile(
        name=name,
        source=f"measured by flexlab.cost.calibrate on {time.strftime('%Y-%m-%d')} "
        f"({dtype}, {'quick' if quick else 'full'})",
        gpu_memory=gpu_memory,
        cpu_memory=cpu_memory,
        disk_space=float(shutil.disk_usage(directory).free),
        llc_bytes=_llc_bytes() if device.type == "cpu" else 0.0,  # a GPU's batches each read HBM
        **results,
    )
