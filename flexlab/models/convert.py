"""Write a model as an offload-ready checkpoint directory: safetensors shards the engine reads in
place from disk (no second copy at engine start), optionally in another dtype. Also how random
checkpoints of any size are made: one tensor at a time, never the whole model in memory (an
OPT-30B-shaped model in float16 needs 60 GB of disk but no more memory than its largest shard).

    >>> convert_checkpoint("opt-1.3b-bin", "/data/opt-1.3b-offload", dtype=torch.float16)  # doctest: +SKIP
    >>> save_checkpoint(Model.from_config("opt-13b"), "/data/opt-13b-random", dtype=torch.float16)  # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from flexlab.errors import CheckpointError
from flexlab.files import disown, owned_dir, remove, sweep_stale

SHARD_BYTES = 2 << 30
COPIED = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
    "special_tokens_map.json",
)


def convert_checkpoint(
    source: str | os.PathLike, target: str | os.PathLike, *, dtype: torch.dtype | None = None, progress: bool = True
) -> Path:
    """Write ``source``'s weights (any checkpoint ``Model.from_pretrained`` reads) as safetensors
    shards in ``target``, with its config and tokenizer files; see :func:`save_checkpoint`."""
    from flexlab.models.model import Model

    _check_target(Path(target).expanduser())
    model = Model.from_pretrained(source, dtype=dtype, device="cpu")
    try:
        return save_checkpoint(model, target, dtype=dtype, progress=progress)
    finally:
        model.weights.close()


def save_checkpoint(
    model, target: str | os.PathLike, *, dtype: torch.dtype | None = None, progress: bool = True
) -> Path:
    """Write ``model``'s weights (from a checkpoint, or random) as safetensors shards of at most
    2 GiB in ``target``, with a ``config.json`` (and the source's tokenizer files, if any), one
    tensor at a time. ``transformers`` and ``Model.from_pretrained`` load the result. Atomic: the
    directory appears complete or not at all. Refuses a non-empty ``target``."""
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    target = Path(target).expanduser()
    _check_target(target)
    source_dir = Path(model.source) if Path(model.source).is_dir() else None
    target.parent.mkdir(parents=True, exist_ok=True)
    # Written beside the target and renamed into place when complete; removed on any way out
    # (a killed process's leftover is swept by the next conversion into the same place).
    sweep_stale(target.parent, f".{target.name}.")
    tmp = owned_dir(target.parent, f".{target.name}.")
    try:
        shard: dict[str, torch.Tensor] = {}
        size = 0
        shards: list[list[str]] = []  # tensor names per written shard

        def flush() -> None:
            nonlocal shard, size
            if shard:
                save_file(shard, str(tmp / f"shard-{len(shards)}.safetensors"), metadata={"format": "pt"})
                shards.append(list(shard))
                shard, size = {}, 0

        for name in tqdm(list(model.weights.specs), desc="writing weights", disable=not progress):
            t = model.weights.get(name, dtype).contiguous()  # None: as stored
            if size + t.numel() * t.element_size() > SHARD_BYTES:
                flush()
            shard[name] = t
            size += t.numel() * t.element_size()
        flush()
        if len(shards) == 1:  # the names transformers (and flexlab's loader) look for
            os.replace(tmp / "shard-0.safetensors", tmp / "model.safetensors")
        else:
            weight_map = {}
            for i, tensors in enumerate(shards):
                final = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                os.replace(tmp / f"shard-{i}.safetensors", tmp / final)
                weight_map.update(dict.fromkeys(tensors, final))
            (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
        for name in COPIED:
            if source_dir is not None and (source_dir / name).exists():
                shutil.copy2(source_dir / name, tmp / name)
        if not (tmp / "config.json").exists():
            hf = model.family.config_to_hf(model.config)
            hf["torch_dtype"] = str(t.dtype).removeprefix("torch.")
            (tmp / "config.json").write_text(json.dumps(hf, indent=2))
        disown(tmp)  # from here on it is the result, not scratch
        for path in tmp.iterdir():  # on disk before the rename makes the folder visible
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        if target.exists():
            target.rmdir()
        os.replace(tmp, target)
    except BaseException:
        remove(tmp)
        raise
    return target


def _check_target(target: Path) -> None:
    """Refuse, before any work, a target that is a file, not empty, or in a place nothing can be
    written (the parent is created if missing)."""
    if target.exists() and not target.is_dir():
        raise CheckpointError(f"{target} is a file; the target is a new directory")
    if target.exists() and any(target.iterdir()):
        raise CheckpointError(f"{target} exists and is not empty; choose a new directory")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=f".{target.name}.probe-", dir=target.parent):
            pass
    except OSError as e:
        raise CheckpointError(
            f"cannot write a checkpoint in {target.parent} ({e.strerror}); pick a writable place for the target"
        ) from None
