"""The compute device and dtype a caller gets when it does not say: one rule for the whole package.

>>> import torch
>>> device_and_dtype("cpu")
(device(type='cpu'), torch.bfloat16)
"""

from __future__ import annotations

import torch


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """``None``/``"auto"``: CUDA when present, else the CPU."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def default_dtype(device: torch.device) -> torch.dtype:
    """The dtype the device computes fast in: float16 on CUDA; bfloat16 on a CPU, where float16
    matmuls are hundreds of times slower."""
    return torch.float16 if device.type == "cuda" else torch.bfloat16


def device_and_dtype(
    device: str | torch.device | None = None, dtype: torch.dtype | None = None
) -> tuple[torch.device, torch.dtype]:
    """``device`` resolved and ``dtype`` defaulted for it."""
    device = resolve_device(device)
    return device, dtype or default_dtype(device)
