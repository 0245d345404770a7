"""The compute device and dtype a caller gets when it does not say: one rule for the whole package.

>>> import torch
>>> device_and_dtype("cpu")[1] == (torch.bfloat16 if cpu_has_fast_bfloat16() else torch.float32)
True
"""

from __future__ import annotations

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
