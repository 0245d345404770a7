"""The three tiers' plumbing: byte accounting, reusable I/O buffers, and disk reads and writes.

"gpu" is the compute device (CUDA, or the CPU on a machine without one), "cpu" is host memory,
"disk" is files under the engine's offload directory. On a CPU-only machine gpu and cpu share
RAM, but they are accounted apart so that placement and peaks read the same as on a GPU.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import shutil
import threading
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from flexlab.engine.placement import ALIGN, TIERS, align_up
from flexlab.errors import OffloadError


class MemoryTracker:
    """Current and peak bytes per tier, by category (weights, cache, activations, buffers)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.current: dict[tuple[str, str], int] = defaultdict(int)
        self._totals: dict[str, int] = defaultdict(int)  # per tier, kept with ``current`` (asked per step)
        self.peak_by_tier: dict[str, int] = defaultdict(int)
        self._at_peak: dict[str, dict[str, int]] = {}  # per tier: bytes by category when it peaked
        self._history: list[tuple[float, str, int]] | None = None  # (seconds, tier, bytes) while recording
        self._base = 0.0

    def add(self, tier: str, category: str, nbytes: int) -> None:
        if not nbytes:  # e.g. a resident stage's load, which copies nothing: several per step
            return
        with self._lock:
            self.current[(tier, category)] += nbytes
            self._totals[tier] += nbytes
            total = self._totals[tier]
            if total >= self.peak_by_tier[tier]:
                self.peak_by_tier[tier] = total
                self._at_peak[tier] = {c: v for (t, c), v in self.current.items() if t == tier and v}
            if self._history is not None:
                self._history.append((time.perf_counter() - self._base, tier, total))

    def _total(self, tier: str) -> int:
        return self._totals[tier]

    @contextlib.contextmanager
    def recording(self, base: float):
        """Record each tier's total after every change, in seconds from ``base`` (a
        ``time.perf_counter()`` value: the run's clock), starting with what is held now; yields
        the list of ``(seconds, tier, bytes)`` it fills. Host time: on CUDA the host issues
        allocations ahead of the kernels that use them."""
        with self._lock:
            self._base = base
            self._history = [(time.perf_counter() - base, t, self._total(t)) for t in TIERS]
            history = self._history
        try:
            yield history
        finally:
            with self._lock:
                self._history = None

    def sub(self, tier: str, category: str, nbytes: int) -> None:
        self.add(tier, category, -nbytes)

    def clear(self, tier: str, category: str) -> None:
        """Forget what a category holds (after a failed run, whose releases may not all have run)."""
        with self._lock:
            self._totals[tier] -= self.current.pop((tier, category), 0)

    def reset_peaks(self) -> None:
        """Start measuring peaks afresh from what is allocated now."""
        with self._lock:
            for tier in TIERS:
                self.peak_by_tier[tier] = self._total(tier)
                self._at_peak[tier] = {c: v for (t, c), v in self.current.items() if t == tier and v}

    def breakdown(self) -> dict[str, dict[str, int]]:
        """Per tier, the bytes of each category (weights, kv cache, ...) at that tier's peak."""
        with self._lock:
            return {t: dict(self._at_peak.get(t, {})) for t in TIERS}

    def peaks(self) -> dict[str, int]:
        return {t: self.peak_by_tier.get(t, 0) for t in TIERS}


def return_freed_memory() -> None:
    """Hand memory freed by a run back to the operating system. glibc keeps freed blocks for
    reuse, so a process that held a run's hidden states keeps their size in its resident memory
    after the run (1.3 GiB after a 64-prompt opt-125m prefill with activations on the cpu tier).
    A no-op where the C library has no ``malloc_trim``."""
    try:
        ctypes.CDLL(None).malloc_trim(0)  # the process's own symbols: glibc's, on Linux
    except (OSError, AttributeError):
        pass


def disk_full(path: Path, need: int) -> OffloadError:
    """The one-line error for a write that found the disk full: which directory, how much."""
    try:
        free = shutil.disk_usage(path.parent).free
    except OSError:
        free = 0
    return OffloadError(
        f"the disk holding {str(path.parent)!r} is full: writing {_human(need)} to {path.name} "
        f"failed with {_human(free)} free; free space, pass another offload_dir, or lower the "
        "policy's disk shares"
    )


def _human(n: float) -> str:
    if n < 1024:
        return f"{int(n)} bytes"
    for unit in ("KiB", "MiB", "GiB"):
        n /= 1024
        if n < 1024 or unit == "GiB":
            break
    return f"{n:.1f} {unit}"


def _full(e: OSError) -> bool:
    return e.errno in (errno.ENOSPC, errno.EDQUOT)


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def aligned_empty(size: int, pin: bool = False) -> torch.Tensor:
    """A uint8 buffer of ``size`` bytes whose address is ALIGN-aligned (for O_DIRECT)."""
    raw = torch.empty(size + ALIGN, dtype=torch.uint8, pin_memory=pin)
    shift = (-raw.data_ptr()) % ALIGN
    return raw[shift : shift + size]


def staging_tier(device: torch.device) -> str:
    """Where read buffers count in the memory tracker: host memory next to a GPU; on a CPU-only
    machine the compute's own memory, the gpu tier."""
    return "cpu" if device.type == "cuda" else "gpu"


class BufferPool:
    """A fixed set of staging buffers, handed out and returned; no allocation per read.

    A request for ``nbytes`` waits for a buffer of the smallest size among the pool's that holds
    it (never a larger one: that one is kept for the loads that need it, see
    :func:`~flexlab.engine.placement.weight_read_buffers`)."""

    timeout: float | None = None  # seconds a request may wait (tests set one: a lost buffer hangs)

    def __init__(self, sizes: list[int], pin: bool = False) -> None:
        self.size, self.count = max(sizes, default=0), len(sizes)
        self._all = [aligned_empty(n, pin) for n in sizes]
        self._ready = threading.Condition()
        self._free: list[torch.Tensor] = []
        self.reclaim()

    @property
    def free(self) -> int:
        """Buffers not handed out now (all of them between runs, or one was never returned)."""
        return len(self._free)

    def acquire(self, nbytes: int = 0) -> torch.Tensor:
        assert self.count, "a buffer asked of an empty pool (nothing on disk): it would wait forever"
        fitting = [b.numel() for b in self._all if b.numel() >= nbytes]
        assert fitting, f"no buffer of the pool holds {nbytes} bytes (the largest holds {self.size})"
        size = min(fitting)
        with self._ready:
            while True:
                for i, buf in enumerate(self._free):
                    if buf.numel() == size:
                        return self._free.pop(i)
                if not self._ready.wait(self.timeout):
                    raise TimeoutError(f"no read buffer of {size} bytes came back in {self.timeout} s")

    def release(self, buf: torch.Tensor) -> None:
        with self._ready:
            self._free.append(buf)
            self._ready.notify_all()

    def reclaim(self) -> None:
        """Make every buffer free again. Only when nothing can still be using one: after a failed
        run whose transfers have all ended, a buffer it took and never gave back is not in use."""
        with self._ready:
            self._free = list(self._all)
            self._ready.notify_all()


class DiskFiles:
    """Open file descriptors by path; reads use O_DIRECT where the file system allows it.

    O_DIRECT bypasses the page cache, so disk reads cost what they cost on a cold machine
    (the page cache would otherwise make a second read come from RAM).
    """

    CHUNK = 8 << 20  # large reads are split into chunks of this size, read concurrently

    def __init__(self, direct: bool = True, io_threads: int = 4) -> None:
        self.direct = direct and hasattr(os, "O_DIRECT")
        # A virtual disk serves several outstanding reads faster than one at a time.
        self._pool = ThreadPoolExecutor(io_threads, thread_name_prefix="flexlab-disk") if io_threads > 1 else None
        self._fds: dict[tuple[Path, bool, bool], int] = {}
        self._lock = threading.Lock()
        self.read_bytes = 0  # totals over all reads, for benchmarks: disk time apart from copies
        self.read_seconds = 0.0

    def _fd(self, path: Path, direct: bool, write: bool = False) -> int:
        key = (path, direct, write)
        with self._lock:
            if key not in self._fds:
                flags = (os.O_RDWR if write else os.O_RDONLY) | (os.O_DIRECT if direct else 0)
                self._fds[key] = os.open(path, flags)
            return self._fds[key]

    def read(self, path: Path, offset: int, size: int, buf: torch.Tensor) -> torch.Tensor:
        """Read ``size`` bytes at ``offset`` into ``buf``; returns the uint8 view holding them."""
        start_time = time.perf_counter()
        view = self._read(path, offset, size, buf)
        with self._lock:
            self.read_bytes += size
            self.read_seconds += time.perf_counter() - start_time
        return view

    def _read(self, path: Path, offset: int, size: int, buf: torch.Tensor) -> torch.Tensor:
        if self._pool is not None and size >= 2 * self.CHUNK and offset % ALIGN == 0 and buf.data_ptr() % ALIGN == 0:
            # Each chunk starts aligned, so it lands at its own place in buf (list() re-raises errors).
            list(
                self._pool.map(
                    lambda a: self._read_one(
                        path, offset + a, min(self.CHUNK, size - a), buf[a : a + self.CHUNK + ALIGN]
                    ),
                    range(0, size, self.CHUNK),
                )
            )
            return buf[:size]
        return self._read_one(path, offset, size, buf)

    def _read_one(self, path: Path, offset: int, size: int, buf: torch.Tensor) -> torch.Tensor:
        if self.direct:
            start = offset - offset % ALIGN
            length = -(-(offset + size - start) // ALIGN) * ALIGN
            if length <= buf.numel() and buf.data_ptr() % ALIGN == 0:
                try:
                    got = os.preadv(self._fd(path, True), [buf[:length].numpy().data], start)
                    if got >= offset - start + size:
                        return buf[offset - start : offset - start + size]
                except OSError:  # e.g. tmpfs refuses O_DIRECT: fall back to buffered reads
                    self.direct = False
        got = os.preadv(self._fd(path, False), [buf[:size].numpy().data], offset)
        if got != size:
            raise OSError(f"short read from {path}: {got} of {size} bytes at offset {offset}")
        return buf[:size]

    def write(self, path: Path, offset: int, data: torch.Tensor) -> None:
        """Write a tensor's bytes at ``offset``: with O_DIRECT when offset and size are aligned
        (the page cache then holds no copy), else buffered."""
        size = nbytes(data)
        if self.direct and offset % ALIGN == 0 and size % ALIGN == 0:
            if data.is_contiguous() and data.data_ptr() % ALIGN == 0:
                raw = data.view(torch.uint8).reshape(-1)
            else:  # one copy, straight from ``data`` (which may be strided), into an aligned buffer
                raw = aligned_empty(size)
                raw.view(data.dtype).view(data.shape).copy_(data)
            try:
                self._pwrite(self._fd(path, True, write=True), raw, path, offset)
                return
            except OSError as e:
                if e.errno != errno.EINVAL:  # EINVAL: the file system refuses O_DIRECT (tmpfs)
                    raise
                self.direct = False
        self._pwrite(self._fd(path, False, write=True), data.contiguous().view(torch.uint8).reshape(-1), path, offset)

    @staticmethod
    def _pwrite(fd: int, raw: torch.Tensor, path: Path, offset: int) -> None:
        try:
            written = os.pwrite(fd, raw.numpy().data, offset)
        except OSError as e:
            if _full(e):
                raise disk_full(path, raw.numel()) from None
            raise
        if written != raw.numel():  # a short write is how a nearly full disk answers
            raise disk_full(path, raw.numel())

    def remove(self, path: Path) -> None:
        """Close this file's descriptors and delete it. (A descriptor left open would point a
        later file of the same name at this one's deleted data.)"""
        with self._lock:
            for key in [k for k in self._fds if k[0] == path]:
                os.close(self._fds.pop(key))
        path.unlink(missing_ok=True)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()


def write_packed(path: Path, tensors) -> list[tuple[int, torch.Tensor]]:
    """Write tensors one after another at ALIGN-aligned offsets into one file, atomically
    (a temporary file and a rename). Returns ``(offset, tensor)`` pairs. The layout lets one
    O_DIRECT read bring the whole file into a buffer with every tensor where it was written."""
    tmp = path.with_name(f".{path.name}.tmp")
    placed, offset = [], 0
    try:
        with open(tmp, "wb") as f:
            for t in tensors:
                f.seek(offset)
                f.write(memoryview(t.contiguous().view(torch.uint8).reshape(-1).numpy()))
                placed.append((offset, t))
                offset = align_up(offset + nbytes(t))
            f.truncate(offset)
            # On disk before it is used: dirty pages would be written back under the first
            # O_DIRECT reads (which flush them first) and make the disk look slow.
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        if _full(e):
            raise disk_full(path, offset) from None
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return placed


def preallocate(path: Path, size: int) -> None:
    """Create a file of ``size`` bytes whose blocks are reserved now, so a full disk fails here."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        if size:
            os.posix_fallocate(fd, 0, size)
    except OSError as e:
        os.close(fd)
        path.unlink(missing_ok=True)
        if _full(e):
            raise disk_full(path, size) from None
        raise
    os.close(fd)
