"""The compute device and dtype a caller gets when it does not say: one rule for the whole package.

>>> import torch
>>> device_and_dtype("cpu")[1] == (torch.bfloat16 if cpu_has_fast_bfloat16() else torch.float32)
True
"""

from __future__ import annotations

from pathlib import Path

import torch


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """``None``/``"auto"``: CUDA when present, else the CPU."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def cpu_has_fast_bfloat16() -> bool:
    """Whether this CPU has oneDNN's native bfloat16 kernels (AVX-512 or AMX). Without them (a
    CPU with only AVX2, as many laptops) a bfloat16 matmul is emulated: measured here 0.8 GFLOP/s
    against float32's 100 on two cores, where a CPU with AMX gave bfloat16 ~330."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch built without oneDNN
        return False


def default_dtype(device: torch.device) -> torch.dtype:
    """The dtype the device computes fast in: float16 on CUDA; on a CPU (where float16 matmuls are
    hundreds of times slower) bfloat16 if it has native kernels for it, else float32."""
    if device.type == "cuda":
        return torch.float16
    return torch.bfloat16 if cpu_has_fast_bfloat16() else torch.float32


def device_and_dtype(
    device: str | torch.device | None = None, dtype: torch.dtype | None = None
) -> tuple[torch.device, torch.dtype]:
    """``device`` resolved and ``dtype`` defaulted for it."""
    device = resolve_device(device)
    return device, dtype or default_dtype(device)


# ---- host memory as the operating system sees it -------------------------------------------
def resident_bytes(peak: bool = False) -> int | None:
    """This process's resident memory now (``peak``: the most it has held, VmHWM), from
    /proc/self/status; None where there is no /proc (not Linux)."""
    key = "VmHWM:" if peak else "VmRSS:"
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def cgroup_memory_limit() -> int | None:
    """The memory limit of this process's cgroup (v2 ``memory.max`` or v1
    ``memory.limit_in_bytes``, with the page cache charged to it), or None when there is none."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        candidates = []
        if controllers == "":
            candidates.append(Path("/sys/fs/cgroup") / path.lstrip("/") / "memory.max")
        elif "memory" in controllers.split(","):
            candidates.append(Path("/sys/fs/cgroup/memory") / path.lstrip("/") / "memory.limit_in_bytes")
        for file in candidates:
            try:
                text = file.read_text().strip()
            except OSError:
                continue
            if text != "max" and int(text) < 2**60:  # v1 writes "no limit" as a page-rounded 2**63
                return int(text)
    return None


def available_memory() -> int | None:
    """What this process may still grow to, in bytes: its cgroup's limit when one is set, else
    the machine's available memory (MemAvailable) plus what the process holds now; None where
    neither can be read."""
    limit = cgroup_memory_limit()
    if limit is not None:
        return limit
    free = machine_available()
    return None if free is None else free + (resident_bytes() or 0)


def machine_available() -> int | None:
    """The machine's available memory now (MemAvailable, bytes), or None where it cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None
