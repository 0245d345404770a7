"""The timed probes that :func:`~flexlab.cost.calibrate` and :func:`~flexlab.cost.refresh` are
made of: each times one operation as the engine runs it, alone (a disk read, a dequantization,
the KV codec, a disk-cache move), or derives a cost from two timings.

On a shared machine a probe of a tenth of a second can land in a slow second: these take
medians, alternate the sizes they compare, and refuse (with a warning) a difference within noise.
"""

from __future__ import annotations

import functools
import os
import statistics
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from flexlab.compress import QuantConfig, dequantize, quantize
from flexlab.engine.tiers import DiskFiles, aligned_empty
from flexlab.errors import FlexlabError
from flexlab.models import layers

CODEC_PROBE_HIDDEN = 768  # the KV codec is probed on opt-125m's rows (its rate hardly depends on the width)


def median_seconds(fn: Callable[[], object], repeats: int, device: torch.device) -> float:
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


def disk_rates(directory: Path, size: int, repeats: int, write: bool = True) -> tuple[float, float, float]:
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
            read = size / median_seconds(
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


def reads_rate(reads: Sequence[tuple[Path, int, int]], repeats: int) -> float:
    """Bytes/s of the given O_DIRECT reads (``(file, offset, bytes)``, e.g. an engine's
    :meth:`~flexlab.engine.Engine.weight_reads`), each one request as the engine issues it: the
    median of ``repeats`` passes over them all. On a virtual disk whose host caches what was
    touched recently, a file just written reads up to 2x faster than files written before a run."""
    largest = max(size for _, _, size in reads)
    files, buf = DiskFiles(direct=True), aligned_empty(largest + 2 * 4096)
    try:

        def one_pass() -> None:
            for path, offset, size in reads:
                files.read(path, offset, size, buf)

        return sum(size for _, _, size in reads) / median_seconds(one_pass, repeats, torch.device("cpu"))
    finally:
        files.close()


def matmul_rate(device: torch.device, dtype: torch.dtype, h: int, repeats: int) -> float:
    """FLOP/s of an MLP-shaped matmul: ``[h/2, h] @ [h, 4h]`` (a prefill's batch of rows)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(h // 2, h, generator=g).to(device, dtype)
    w = torch.randn(h, 4 * h, generator=g).to(device, dtype)
    return 2 * x.shape[0] * h * 4 * h / median_seconds(lambda: x @ w, repeats, device)


def weight_read_rate(device: torch.device, dtype: torch.dtype, h: int, repeats: int, packed: bool = False) -> float:
    """Bytes/s a decode's few rows read a weight at: ``[8, 4h] @ [4h, 8h]``, a weight larger
    than any CPU cache, so it comes from memory every time. ``packed``: the weight as a CPU
    computing in bfloat16 holds it in memory (:func:`~flexlab.models.layers.packed`), applied as
    the families apply it."""
    g = torch.Generator().manual_seed(0)
    big = torch.randn(4 * h, 8 * h, generator=g).to(device, dtype)
    xs = torch.randn(8, 4 * h, generator=g).to(device, dtype)
    if packed:
        w = layers.packed(big.t().contiguous())
        return big.numel() * big.element_size() / median_seconds(lambda: layers.project(xs, w), repeats, device)
    return big.numel() * big.element_size() / median_seconds(lambda: xs @ big, repeats, device)


def llc_weight_read_rate(device: torch.device, dtype: torch.dtype, repeats: int, packed: bool = False) -> float:
    """Bytes/s a decode's few rows read a weight that stays in a CPU's last-level cache:
    ``[8, 768] @ [768, 3072]`` (opt-125m's first MLP matrix, 4.7 MB in bfloat16), the same weight
    every call. On an AVX-512 host with bfloat16 it ran at 22 GB/s, i.e. 180 GFLOP/s against 370
    for the prefill's rows: charging the token's later batches their FLOPs alone made opt-125m's
    decode 20% fast. 0 on a GPU (its batches each read HBM). ``packed``: as :func:`weight_read_rate`."""
    if device.type != "cpu":
        return 0.0
    g = torch.Generator().manual_seed(0)
    w = torch.randn(768, 3072, generator=g).to(dtype)
    x = torch.randn(8, 768, generator=g).to(dtype)
    if packed:
        p = layers.packed(w.t().contiguous())
        return w.numel() * w.element_size() / median_seconds(lambda: layers.project(x, p), 10 * repeats, device)
    return w.numel() * w.element_size() / median_seconds(lambda: x @ w, 10 * repeats, device)


def convert_rate(dtype: torch.dtype, repeats: int) -> float:
    """Elements/s a CPU converts float16 into ``dtype`` (the per-read conversion of a narrower
    checkpoint read in place, :func:`~flexlab.engine.placement.reads_in_place`) on a thread of its
    own while this one streams weights from memory, as the engine's weight lane converts beside a
    decode's matmuls: both are bound by the memory's bandwidth. Alone, 6.8-7.4 G elements/s here;
    beside a decode 3.9-4.4, and 3.7-4.6 in the lane of an engine (opt-350m and opt-1.3b, all on
    disk, 2026-12-07). 0 where nothing is converted on a read (``dtype`` not wider than 2 bytes)."""
    if dtype.itemsize <= 2:
        return 0.0
    n = 8 << 20  # 16 MB in, 32 MB out: beyond a last-level cache, as a layer's matrices are
    src, dst = torch.ones(n, dtype=torch.float16), torch.zeros(n, dtype=dtype)  # its pages touched
    weights = [torch.ones(2048, 2048, dtype=dtype) for _ in range(4)]  # 64 MB in float32
    row = torch.ones(1, 2048, dtype=dtype)
    times: list[float] = []

    def convert() -> None:
        for _ in range(repeats):
            start = time.perf_counter()
            dst.copy_(src)
            times.append(time.perf_counter() - start)

    worker = threading.Thread(target=convert, name="flexlab-convert-probe")
    worker.start()
    i = 0
    while worker.is_alive():  # the decode beside it: one row times each matrix in turn
        torch.nn.functional.linear(row, weights[i % len(weights)])
        i += 1
    worker.join()
    return n / statistics.median(times)


DEQUANT_PROBE_WIDTHS = (768, 1536)  # a CPU's probe layers: opt-125m's width, and twice it


def dequant_rates(device: torch.device, dtype: torch.dtype, repeats: int) -> tuple[float, float, float]:
    """(elements/s, seconds per matrix, elements/s for small matrices) dequantizing 4-bit
    matrices as the engine does, on two layers' worth of matrices: opt-125m's shape and one 2x
    (CPU) or 4x (GPU) as wide.

    On a GPU, time is calls x a fixed cost + elements / rate, fitted to the two: the small layer
    is mostly the fixed cost (kernel launches), so a rate from it alone was 5x too slow for
    opt-1.3b's matrices; the third value is 0. On a CPU the rate depends on the matrices' size:
    opt-125m's dequantize at 1.5-1.8 G elements/s here, twice as wide at 0.5 (their temporaries
    outgrow the cache), so a fit's "marginal rate" (0.4) predicted opt-125m's 4-bit runs 19%
    slow; each layer's own rate is returned (large, 0, small), and the cost model interpolates
    by the model's width (:data:`DEQUANT_PROBE_WIDTHS`)."""
    g = torch.Generator().manual_seed(0)
    cfg = QuantConfig(bits=4, group_size=64)

    def layer(h: int) -> tuple[int, float]:
        shapes = [(h, h)] * 4 + [(4 * h, h), (h, 4 * h)]
        qs = [quantize(torch.randn(s, generator=g).to(device, dtype), cfg) for s in shapes]
        if device.type == "cuda":  # into fresh tensors, as the engine's (the caching allocator reuses blocks)
            return sum(q.numel for q in qs), median_seconds(lambda: [dequantize(q, dtype) for q in qs], repeats, device)
        outs = [torch.empty(s, dtype=dtype) for s in shapes]  # a CPU's engine dequantizes into one buffer, reused
        run = lambda: [dequantize(q, dtype, out=o) for q, o in zip(qs, outs)]  # noqa: E731
        return sum(q.numel for q in qs), median_seconds(run, repeats, device)

    if device.type != "cuda":
        (small, t_small), (large, t_large) = (layer(h) for h in DEQUANT_PROBE_WIDTHS)
        return large / t_large, 0.0, small / t_small
    (small, t_small), (large, t_large) = layer(768), layer(768 * 4)
    return (*rate_and_call(small, t_small, large, t_large, 6, "dequantization's rate per element"), 0.0)


def rate_and_call(small: int, t_small: float, large: int, t_large: float, calls: int, what: str) -> tuple[float, float]:
    """Elements/s and seconds per call from two timings of ``calls`` calls on ``small`` and
    ``large`` elements (time = calls x a fixed cost + elements / rate); where the difference is
    within noise, the large run's rate alone and no fixed cost."""
    rate = difference_rate(large - small, t_large, t_small, what)
    if rate is None:
        return large / t_large, 0.0
    return rate, max(0.0, t_small - small / rate) / calls


def cpu_seconds(fn: Callable[[], object], repeats: int) -> float:
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


def cache_move_cpu_seconds(directory: Path, count: int, tokens: int, hidden: int, dtype: torch.dtype) -> float:
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
            cpu_seconds(lambda: torch.cat([read(), row], 1), 9) - cpu_seconds(lambda: torch.cat([resident, row], 1), 9)
        )
        store = 2 * cpu_seconds(lambda: files.write(path, 0, row.transpose(0, 1)), 9)
    finally:
        files.close()
        path.unlink(missing_ok=True)
    return max(0.0, (load + store) / 2)


def difference_rate(work: float, slow: float, fast: float, what: str) -> float | None:
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


def difference_seconds(count: int, slow: float, fast: float, what: str) -> float:
    """Seconds each of ``count`` events adds to a run (``slow`` against ``fast``); 0 with a
    warning where the difference is within noise."""
    rate = difference_rate(count, slow, fast, what)
    return 0.0 if rate is None else 1 / rate


def codec_rates(device: torch.device, dtype: torch.dtype, hidden: int, rounds: int = 9) -> tuple[float, float]:
    """(elements/s, seconds per call) of the KV codec (a 4-bit quantize and dequantize of a
    batch of 8 sequences' rows), fitted to batches of 64 and 256 (GPU: 1024) cached tokens
    alone, timed in alternation (the median of ``rounds`` each), so that a slow second of a
    shared machine falls on both sizes rather than skewing one. On a GPU a call's launches, not
    its elements, dominate the engine's small batches. On a CPU this replaced the engine's
    slowdown with a 4-bit cache, which swung 4x between calibrations (0.07-0.27 G elements/s):
    the codec adds under 10% to a run, inside the noise of two runs on a shared machine."""
    g = torch.Generator().manual_seed(0)
    cfg = QuantConfig(bits=4, group_size=64)
    sizes = (64, 1024 if device.type == "cuda" else 256)  # on a CPU, 256 tokens stay in the cache as the engine's do
    batches = [torch.randn(8, tokens, hidden, generator=g).to(device, dtype) for tokens in sizes]
    times: list[list[float]] = [[], []]

    def codec(rows: torch.Tensor) -> torch.Tensor:
        return dequantize(quantize(rows, cfg), dtype)

    for _ in range(rounds):
        for rows, timed in zip(batches, times):
            timed.append(median_seconds(functools.partial(codec, rows), 1, device))
    (small, large), (t_small, t_large) = [2 * b.numel() for b in batches], map(statistics.median, times)
    return rate_and_call(small, t_small, large, t_large, 2, "the KV codec's rate per element")


def sparse_rates(device: torch.device, dtype: torch.dtype, rounds: int = 7) -> tuple[float, float]:
    """(bytes/s, seconds per call) of sparse attention's own work beyond dense attention's, per
    batch and layer: picking each head's rows, gathering the kept value rows (from memory, as the
    cache's in-memory tiers give them) and weighting them. One batch (8 sequences, 12 heads of 64,
    keep 0.25) over 64 and 512 cached tokens, each timed against the dense step over the same
    cache, in alternation; fitted as a fixed cost plus the kept rows' bytes (as the cost model
    expects them: :func:`~flexlab.cost.sparse.expected_union`) at a rate."""
    from flexlab.cost.sparse import expected_union
    from flexlab.engine.cache import LoadedCache
    from flexlab.engine.sparse import sparse_decode
    from flexlab.models.attention import attention_bias, decode_attention

    g = torch.Generator().manual_seed(0)
    b, heads, d, keep = 8, 12, 64, 0.25

    def case(length: int) -> tuple[Callable[[], object], Callable[[], object], float]:
        q, k_new, v_new = (torch.randn(b, heads, 1, d, generator=g).to(device, dtype) for _ in range(3))
        keys, values = (torch.randn(b, heads, length, d, generator=g).to(device, dtype) for _ in range(2))
        rows = values.transpose(1, 2).contiguous().view(-1, heads, d)  # token-major, as a slot stores them
        bias = attention_bias(torch.ones(b, length + 1, dtype=torch.bool, device=device), 1)
        assert isinstance(bias, torch.Tensor), "one query and no position bias: a plain mask"
        first = torch.arange(b, device=device)[:, None] * length

        def gather(wanted: torch.Tensor, *_) -> torch.Tensor:
            return rows.index_select(0, (first + wanted.clamp(min=0)).flatten()).view(*wanted.shape, heads, d)

        cache = LoadedCache(k=keys, v=None)
        kept = b * length * heads * d * dtype.itemsize * expected_union(keep, heads)
        return (
            lambda: sparse_decode(
                q, k_new, v_new, cache, bias, keep=keep, values=gather, stored_tokens=lambda n: n, tail=None
            ),
            lambda: decode_attention(q, k_new, v_new, keys, values, bias),
            kept,
        )

    cases = [case(64), case(512)]
    extra: list[list[float]] = [[], []]
    for _ in range(rounds):
        for (sparse, dense, _), out in zip(cases, extra):
            out.append(median_seconds(sparse, 3, device) - median_seconds(dense, 3, device))
    (small, large), (t_small, t_large) = [c[2] for c in cases], [max(statistics.median(e), 1e-6) for e in extra]
    return rate_and_call(int(small), t_small, int(large), t_large, 1, "sparse attention's work per value byte")
