"""Measure this machine for the cost model: ``calibrate()`` → :class:`HardwareProfile`.

Each rate is timed on the operation the engine itself runs (its matmuls, its attention, its
O_DIRECT reader, its dequantizer, and a whole engine run for the per-step overhead), taking
the best of a few repeats: the machines here are shared and the best run is the machine's.

    >>> hw = calibrate(quick=True)              # doctest: +SKIP
    >>> hw.save("my-machine.json")              # doctest: +SKIP
"""

from __future__ import annotations

import functools
import os
import shutil
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from flexlab.compress import QuantConfig, dequantize, quantize
from flexlab.cost.hardware import RUNTIME_BASE_CPU, RUNTIME_BASE_CUDA, HardwareProfile
from flexlab.devices import device_and_dtype
from flexlab.engine.tiers import DiskFiles, aligned_empty
from flexlab.errors import FlexlabError
from flexlab.models.attention import attend

CODEC_PROBE_HIDDEN = 768  # the KV codec is probed on opt-125m's rows (its rate hardly depends on the width)


def _best(fn: Callable[[], object], repeats: int, device: torch.device) -> float:
    """Median of ``repeats`` timed calls (after one warm-up), in seconds. The median, not the
    best: the model predicts runs on the same shared machine, which see its typical speed."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _disk(directory: Path, size: int, repeats: int, write: bool = True) -> tuple[float, float, float]:
    """Write and O_DIRECT read bandwidth of a fresh file (bytes/s), and the latency of one small
    read (seconds: 64 KiB reads at scattered offsets, their transfer time taken off)."""
    try:  # the engine makes its offload directory, so the probe of it does too
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise FlexlabError(
            f"cannot make the offload directory {directory} to probe the disk ({e}): pass another one"
        ) from e
    path = directory / "flexlab-calibrate.bin"
    data = torch.randint(0, 255, (size,), dtype=torch.uint8)
    try:
        start = time.perf_counter()
        with open(path, "wb") as f:
            f.write(data.numpy().data)
            f.flush()
            os.fsync(f.fileno())
        write_bw = size / (time.perf_counter() - start) if write else float("nan")
        files, buf = DiskFiles(direct=True), aligned_empty(size + 8192)
        try:
            # requests of a stage's size (16 MiB), as the engine reads weights
            req = 16 << 20
            read = size / _best(
                lambda: [files.read(path, off, req, buf) for off in range(0, size, req)], repeats, torch.device("cpu")
            )
            small, count = 64 << 10, 100
            offsets = [(i * 7919 * small) % (size - small) // 4096 * 4096 for i in range(count)]
            start = time.perf_counter()
            for off in offsets:
                files.read(path, off, small, buf)
            latency = max(0.0, (time.perf_counter() - start) / count - small / read)
        finally:
            files.close()
        return read, write_bw, latency
    finally:
        path.unlink(missing_ok=True)


def _dequant_rates(device: torch.device, dtype: torch.dtype, repeats: int) -> tuple[float, float]:
    """(elements/s, seconds per matrix) dequantizing 4-bit matrices as the engine does, fitted to
    two layers' worth of matrices: opt-125m's shape and one 2x (CPU) or 4x (GPU) as wide. Time is
    calls x a fixed cost + elements / rate: on a GPU the small layer is mostly the fixed cost
    (kernel launches), so a rate from it alone was 5x too slow for opt-1.3b's matrices."""
    g = torch.Generator().manual_seed(0)
    cfg = QuantConfig(bits=4, group_size=64)

    def layer(h: int) -> tuple[int, float]:
        shapes = [(h, h)] * 4 + [(4 * h, h), (h, 4 * h)]
        qs = [quantize(torch.randn(s, generator=g).to(device, dtype), cfg) for s in shapes]
        return sum(q.numel for q in qs), _best(lambda: [dequantize(q, dtype) for q in qs], repeats, device)

    (small, t_small), (large, t_large) = layer(768), layer(768 * (4 if device.type == "cuda" else 2))
    return _rate_and_call(small, t_small, large, t_large, 6, "dequantization's rate per element")


def _rate_and_call(
    small: int, t_small: float, large: int, t_large: float, calls: int, what: str
) -> tuple[float, float]:
    """Elements/s and seconds per call from two timings of ``calls`` calls on ``small`` and
    ``large`` elements (time = calls x a fixed cost + elements / rate); where the difference is
    within noise, the large run's rate alone and no fixed cost."""
    rate = _difference_rate(large - small, t_large, t_small, what)
    if rate is None:
        return large / t_large, 0.0
    return rate, max(0.0, t_small - small / rate) / calls


def refresh(
    hw: HardwareProfile,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    offload_dir: str | os.PathLike | None = None,
) -> HardwareProfile:
    """``hw`` with its most volatile rates re-measured now (disk read, dequantization, the KV
    codec; about a second). On a shared machine these swing by 2x within minutes: a prediction
    compared with a measurement should use rates probed next to it."""
    device, dtype = device_and_dtype(device, dtype)
    read, _, latency = _disk(Path(offload_dir or tempfile.gettempdir()), 64 << 20, 3, write=False)
    rate, call = _dequant_rates(device, dtype, 3)
    codec, codec_call = _codec_rates(device, dtype, CODEC_PROBE_HIDDEN)
    return hw.replace(
        disk_read_bw=read,
        disk_latency_s=latency,
        dequant_elems=rate,
        dequant_call_s=call,
        kv_codec_elems=codec,
        kv_codec_call_s=codec_call,
    )


def _engine_seconds(
    model, policy, prompts: list[list[int]], new: int, device: torch.device, offload_dir: Path | None = None
) -> float:
    from flexlab.engine import Engine

    with Engine(model, policy, offload_dir=offload_dir) as engine:
        return _best(lambda: engine.generate(prompts, max_new_tokens=new, stop_token_ids=None), 2, device)


def _step_overheads(
    device: torch.device, dtype: torch.dtype, offload_dir: Path
) -> tuple[float, float, float, float, float]:
    """Seconds per compute step, per transfer step handed to a lane thread, per KV cache load or
    store on a lane, and the KV codec's elements per second and seconds per call.

    The compute step's cost is timed on a model too small for its maths to matter, everything
    resident. A lane's cost is the slowdown when the activations leave the device (every stage
    stores and loads its hidden state on a lane: the cpu tier on a GPU, disk on a CPU, where the
    cpu tier is read in place; a few KB each) on a model with opt-125m-sized layers: on few
    cores a lane thread mostly costs by stalling the compute's parallel kernels, which only
    shows when there is compute to stall. A cache transfer's cost on a GPU is the slowdown when
    the same run's cache goes to the cpu tier, per load and store; on a CPU it is the cores' time
    the disk cache's reads, writes and strided joins take (:func:`_cache_move_cpu_seconds`). The
    codec is fitted to two sizes of it alone (:func:`_codec_rates`).
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
    fast = _engine_seconds(model, Policy(gpu_batch_size=8, num_gpu_batches=nb), prompts, new, device)
    act_cpu = 100 if device.type == "cuda" else 0
    lanes = _engine_seconds(
        model,
        Policy.from_percent([100, 0, 100, 0, 0, act_cpu], gpu_batch_size=8, num_gpu_batches=nb),
        prompts,
        new,
        device,
    )
    transfers = nb * new * 2 * (1 + 2 * shape.num_layers)  # a store and a load between stages
    if device.type == "cuda":
        cache_cpu = Policy.from_percent([100, 0, 0, 100, 100, 0], gpu_batch_size=8, num_gpu_batches=nb)
        cache_moves = nb * shape.num_layers * (2 * new - 1)  # a store every token, a load every decode token
        cache_move = _difference_seconds(
            cache_moves, _engine_seconds(model, cache_cpu, prompts, new, device), fast, "a cache transfer's cost"
        )
    else:
        # An engine-difference here swung 5x between calibrations (0.4-2.0 ms): it also absorbed the
        # probe's wait for the disk, which the model charges on the disk lane already.
        cache_move = _cache_move_cpu_seconds(offload_dir, 8, len(prompts[0]) + new, shape.hidden_size, dtype)
    codec, codec_call = _codec_rates(device, dtype, CODEC_PROBE_HIDDEN)
    return step, _difference_seconds(transfers, lanes, fast, "a lane transfer's cost"), cache_move, codec, codec_call


def _cpu_seconds(fn: Callable[[], object], repeats: int) -> float:
    """Median CPU seconds of a call on one thread, after one warm-up: what it takes from cores
    the compute would otherwise use. One thread, because torch's idle pool threads spin for a
    while after each parallel kernel, which a process-wide CPU clock would count as work."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        fn()
        times = []
        for _ in range(repeats):
            start = time.thread_time()
            fn()
            times.append(time.thread_time() - start)
    finally:
        torch.set_num_threads(threads)
    return statistics.median(times)


def _cache_move_cpu_seconds(directory: Path, count: int, tokens: int, hidden: int, dtype: torch.dtype) -> float:
    """Core seconds of one disk-cache load or store (their mean) of a batch of ``count``
    sequences, ``tokens`` cached, keys and values, beyond what a resident cache costs: a load
    reads each prefix (O_DIRECT: the disk's time is not the cores') and joins the new row to a
    strided view of it instead of a contiguous slice; a store writes one row of each sequence."""
    row_shape = (hidden // 64, 64)
    itemsize = torch.empty((), dtype=dtype).element_size()
    size = tokens * count * hidden * itemsize
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"flexlab-cache-probe-{os.getpid()}.bin"
    files, buf = DiskFiles(direct=True), aligned_empty(size + 8192)
    try:
        path.touch()
        files.write(path, 0, torch.zeros(tokens, count, *row_shape, dtype=dtype))
        resident = torch.zeros(count, tokens, *row_shape, dtype=dtype)
        row = torch.zeros(count, 1, *row_shape, dtype=dtype)

        def read() -> torch.Tensor:
            raw = files.read(path, 0, size, buf)
            return raw.view(dtype).view(tokens, count, *row_shape).transpose(0, 1)

        load = 2 * (
            _cpu_seconds(lambda: torch.cat([read(), row], 1), 9)
            - _cpu_seconds(lambda: torch.cat([resident, row], 1), 9)
        )
        store = 2 * _cpu_seconds(lambda: files.write(path, 0, row.transpose(0, 1)), 9)
    finally:
        files.close()
        path.unlink(missing_ok=True)
    return max(0.0, (load + store) / 2)


def _difference_rate(work: float, slow: float, fast: float, what: str) -> float | None:
    """``work / (slow - fast)``: the rate of what makes one run slower than another; None (with a
    warning) where the difference is within the noise of two timings on a shared machine, which
    would otherwise give an absurd rate (a near-zero divisor)."""
    if slow - fast > 0.05 * fast:
        return work / (slow - fast)
    warnings.warn(
        f"calibrate: {what} could not be measured: the run with it took {slow:.3f} s, without it {fast:.3f} s "
        "(within noise; the machine is likely busy). Rerun calibrate() on a quieter machine for a better value",
        stacklevel=3,
    )
    return None


def _difference_seconds(count: int, slow: float, fast: float, what: str) -> float:
    """Seconds each of ``count`` events adds to a run (``slow`` against ``fast``); 0 with a
    warning where the difference is within noise."""
    rate = _difference_rate(count, slow, fast, what)
    return 0.0 if rate is None else 1 / rate


def _codec_rates(device: torch.device, dtype: torch.dtype, hidden: int, rounds: int = 9) -> tuple[float, float]:
    """(elements/s, seconds per call) of the KV codec (a 4-bit quantize and dequantize of a
    batch of 8 sequences' rows), fitted to batches of 64 and 256 (GPU: 1024) cached tokens
    alone, timed in alternation (the median of ``rounds`` each), so that a slow second of a
    shared machine falls on both sizes rather than skewing one. On a GPU a call's launches, not its elements,
    dominate the engine's small batches. On a CPU this replaced the engine's slowdown with a
    4-bit cache, which swung 4x between calibrations (0.07-0.27 G elements/s): the codec adds
    under 10% to a run, inside the noise of two runs on a shared machine."""
    g = torch.Generator().manual_seed(0)
    cfg = QuantConfig(bits=4, group_size=64)
    sizes = (64, 1024 if device.type == "cuda" else 256)  # on a CPU, 256 tokens stay in the cache as the engine's do
    batches = [torch.randn(8, tokens, hidden, generator=g).to(device, dtype) for tokens in sizes]
    times: list[list[float]] = [[], []]

    def codec(rows: torch.Tensor) -> torch.Tensor:
        return dequantize(quantize(rows, cfg), dtype)

    for _ in range(rounds):
        for rows, timed in zip(batches, times):
            timed.append(_best(functools.partial(codec, rows), 1, device))
    (small, large), (t_small, t_large) = [2 * b.numel() for b in batches], map(statistics.median, times)
    return _rate_and_call(small, t_small, large, t_large, 2, "the KV codec's rate per element")


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
        "step overhead",
        "runtime base",
    ]
    bar = tqdm(steps, desc="calibrating", disable=not progress, leave=False)

    def step(name: str) -> None:
        bar.set_postfix_str(name)
        bar.update(1)

    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(512 * scale, h, generator=g).to(device, dtype)
    w = torch.randn(h, 4 * h, generator=g).to(device, dtype)
    results["matmul_flops"] = 2 * x.shape[0] * h * 4 * h / _best(lambda: x @ w, repeats, device)
    step("matmul")
    big = torch.randn(4 * h, 8 * h, generator=g).to(device, dtype)  # larger than any CPU cache
    xs = torch.randn(8, 4 * h, generator=g).to(device, dtype)
    results["weight_read_bw"] = big.numel() * big.element_size() / _best(lambda: xs @ big, repeats, device)
    step("weight read")

    def attention_bw(dev: torch.device, dt: torch.dtype) -> float:
        b, heads, length, d = 8, 16, 512 * scale, 64
        q = torch.randn(b, heads, 1, d, generator=g).to(dev, dt)
        k = torch.randn(b, heads, length, d, generator=g).to(dev, dt)
        v = torch.randn(b, heads, length, d, generator=g).to(dev, dt)
        bias = torch.zeros(b, 1, 1, length, device=dev)
        return 2 * k.numel() * k.element_size() / _best(lambda: attend(q, k, v, bias), repeats, dev)

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
        results["link_pinned_bw"] = size / _best(lambda: pinned.to(device, non_blocking=True), repeats, device)
        results["link_pageable_bw"] = size / _best(lambda: pageable.to(device), repeats, device)
    else:
        results["link_pinned_bw"] = results["link_pageable_bw"] = float("inf")
    step("link")
    directory = Path(offload_dir or tempfile.gettempdir())
    results["disk_read_bw"], results["disk_write_bw"], results["disk_latency_s"] = _disk(
        directory, (128 if quick else 512) << 20, repeats
    )
    step("disk")
    results["dequant_elems"], results["dequant_call_s"] = _dequant_rates(device, dtype, repeats)

    step("dequantize")
    (
        results["step_overhead_s"],
        results["transfer_overhead_s"],
        results["cache_transfer_overhead_s"],
        results["kv_codec_elems"],
        results["kv_codec_call_s"],
    ) = _step_overheads(device, dtype, directory)
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
