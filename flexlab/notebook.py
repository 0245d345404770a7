"""What the notebooks share: smoke mode, and picking a model for the hardware at hand.

>>> setup = notebook_setup(smoke=True, train_if_missing=False)   # doctest: +SKIP
>>> setup.model, setup.smoke, setup.note                         # doctest: +SKIP
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from flexlab.models.model import Model
from flexlab.models.pydoc_model import pydoc_model_path

GPU_CHECKPOINT = "facebook/opt-1.3b"


@dataclass
class NotebookSetup:
    """The model a notebook runs on, whether it runs in smoke mode, and a line saying why."""

    model: Model
    smoke: bool
    note: str

    @property
    def on_gpu(self) -> bool:
        return self.model.device.type == "cuda"


def is_smoke() -> bool:
    """``FLEXLAB_SMOKE=1``: the notebooks run small, fast versions of their work (CI does this)."""
    return os.environ.get("FLEXLAB_SMOKE", "").strip() not in ("", "0", "false", "no")


def notebook_setup(
    *, smoke: bool | None = None, checkpoint: str = GPU_CHECKPOINT, train_if_missing: bool = True
) -> NotebookSetup:
    """A real OPT checkpoint (``checkpoint``, float16) on a GPU; otherwise — or in smoke mode,
    or when the checkpoint cannot be loaded — the small model trained on Python's docs."""
    smoke = is_smoke() if smoke is None else smoke
    if torch.cuda.is_available() and not smoke:
        try:
            model = Model.from_pretrained(checkpoint, dtype=torch.float16, device="cuda")
            return NotebookSetup(model, smoke, f"{checkpoint} on {torch.cuda.get_device_name()}")
        except Exception as e:  # offline, or no room: say so and carry on with the small model
            reason = f"{checkpoint} could not be loaded ({type(e).__name__}: {e}); "
    else:
        reason = "smoke mode; " if smoke else "no GPU; "
    path = pydoc_model_path(train_if_missing=train_if_missing, progress=True)  # a first training takes minutes
    model = Model.from_pretrained(path)  # the device's fast dtype (flexlab.devices)
    dtype = model.dtype
    return NotebookSetup(model, smoke, reason + f"the small model trained on Python's docs ({dtype}, {model.device})")
