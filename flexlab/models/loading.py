"""Checkpoints → named tensors, read lazily.

A :class:`WeightSource` hands out one tensor at a time, so a model larger than host memory can be
placed (later: offloaded to disk) tensor by tensor. Two sources exist:

* :class:`CheckpointWeights` reads a Hugging Face checkpoint directory: safetensors (memory
  mapped; each tensor's file offset is exposed so the engine can read it straight from disk) or
  ``.bin`` (``torch.load(weights_only=True, mmap=True)``: never arbitrary pickle), single file or
  sharded with an index.
* :class:`RandomWeights` makes FlexGen-style dummy weights of any size, deterministically per
  tensor name, without ever allocating the whole model.
"""

from __future__ import annotations

import json
import os
import re
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from flexlab.errors import CheckpointError
from flexlab.models.family import WeightSpec

SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
_WEIGHT_FILES = (
    "model.safetensors.index.json",
    "model.safetensors",
    "pytorch_model.bin.index.json",
    "pytorch_model.bin",
)


@dataclass(frozen=True)
class TensorLocation:
    """Where a tensor's raw bytes lie in a safetensors file (for direct disk reads)."""

    path: Path
    offset: int  # from the start of the file
    nbytes: int
    dtype: torch.dtype
    shape: tuple[int, ...]


class WeightSource:
    """Named tensors handed out one at a time. Subclasses implement :meth:`_read`."""

    def __init__(self, specs: list[WeightSpec]) -> None:
        self.specs = {s.name: s for s in specs}

    def get(self, name: str, dtype: torch.dtype | None = None, device: str | torch.device = "cpu") -> torch.Tensor:
        """The tensor ``name`` (a spec name), converted to ``dtype`` and moved to ``device`` (a view
        of a file's map where :meth:`maps` says so and nothing needed converting or moving)."""
        if name not in self.specs:
            raise KeyError(f"no weight named {name!r}")
        t = self._read(name)
        return t.to(device=device, dtype=dtype or t.dtype)

    def location(self, name: str) -> TensorLocation | None:
        """The tensor's place on disk when it can be read directly, else None."""
        return None

    def maps(self, name: str) -> bool:
        """Whether :meth:`get` may hand out a view of a file's map (its pages are page cache: the
        kernel may drop them and fault them back in mid-compute; keep a copy to hold them)."""
        return False

    def _read(self, name: str) -> torch.Tensor:
        raise NotImplementedError

    def close(self) -> None:
        """Release file handles and maps."""

    def release_pages(self) -> None:
        """Let go of the memory that reading weights so far has filled (maps, page cache), once
        the caller holds its own copies; later reads still work."""


class RandomWeights(WeightSource):
    """Deterministic random weights: tensor ``name`` depends only on ``(seed, name)``."""

    def __init__(self, specs: list[WeightSpec], seed: int = 0, std: float = 0.02) -> None:
        super().__init__(specs)
        self.seed, self.std = seed, std

    def _read(self, name: str) -> torch.Tensor:
        spec = self.specs[name]
        if spec.init == "zeros":
            return torch.zeros(spec.shape)
        if spec.init == "ones":
            return torch.ones(spec.shape)
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + zlib.crc32(name.encode()))
        return torch.randn(spec.shape, generator=gen) * self.std


class CheckpointWeights(WeightSource):
    """Weights of a Hugging Face checkpoint directory, validated on open, read on demand."""

    def __init__(self, directory: str | os.PathLike, specs: list[WeightSpec], canonical_name) -> None:
        super().__init__(specs)
        self.directory = Path(directory)
        self._file_of: dict[str, tuple[Path, str]] = {}  # spec name -> (file, name in that file)
        self._locations: dict[tuple[Path, str], TensorLocation] = {}
        self._handles: dict[Path, Any] = {}  # mmapped .bin state dicts
        self._read_from: set[Path] = set()  # safetensors files read so far (their pages: release_pages)
        for path in _weight_files(self.directory):
            names = self._index_safetensors(path) if path.suffix == ".safetensors" else self._index_bin(path)
            for stored in names:
                spec_name = canonical_name(stored)
                if spec_name is not None:
                    self._file_of[spec_name] = (path, stored)
        missing = [n for n in self.specs if n not in self._file_of]
        if missing:
            raise CheckpointError(
                f"{self.directory}: {len(missing)} weight(s) missing from the checkpoint, e.g. "
                f"{', '.join(missing[:4])}; is it complete, and does config.json match its weights?"
            )
        extra = [n for n in self._file_of if n not in self.specs]
        if extra:  # e.g. more layers than config.json says: running without them would be wrong
            raise CheckpointError(
                f"{self.directory}: {len(extra)} weight(s) in the checkpoint that config.json does not describe, "
                f"e.g. {', '.join(extra[:4])}; does config.json (num_hidden_layers, ...) match its weights?"
            )
        for name, spec in self.specs.items():
            if self._stored_shape(name) != spec.shape:
                raise CheckpointError(
                    f"{self._file_of[name][0].name}: {name} has shape {self._stored_shape(name)} "
                    f"but config.json implies {spec.shape}; the config does not match the weights"
                )
            dtype = self._stored_dtype(name)
            if not dtype.is_floating_point:  # a cast would turn quantized integers into nonsense weights
                raise CheckpointError(
                    f"{self._file_of[name][0].name}: {name} is stored as {str(dtype).removeprefix('torch.')}, not "
                    "floats; flexlab reads float32/float16/bfloat16/float8 checkpoints: dequantize it first "
                    "(flexlab compresses weights itself with Policy(compress_weight=...))"
                )

    def _stored_dtype(self, name: str) -> torch.dtype:
        path, stored = self._file_of[name]
        if path.suffix == ".safetensors":
            return self._locations[(path, stored)].dtype
        return self._handles[path][stored].dtype

    def _stored_shape(self, name: str) -> tuple[int, ...]:
        path, stored = self._file_of[name]
        if path.suffix == ".safetensors":
            return self._locations[(path, stored)].shape
        return tuple(self._handles[path][stored].shape)

    def _index_safetensors(self, path: Path) -> list[str]:
        header, data_start = _read_safetensors_header(path)
        size = path.stat().st_size
        names = []
        for stored, meta in header.items():
            if stored == "__metadata__":
                continue
            try:
                begin, end = (int(x) for x in meta["data_offsets"])
                meta["dtype"], meta["shape"] = str(meta["dtype"]), [int(d) for d in meta["shape"]]
            except (KeyError, TypeError, ValueError):
                raise CheckpointError(
                    f"{path}: the header entry of {stored} is malformed ({meta!r}); the file is "
                    "corrupt: download or save it again"
                ) from None
            if data_start + end > size:
                raise CheckpointError(
                    f"{path} is truncated: {stored} ends at byte {data_start + end} but the file "
                    f"has {size} bytes; download or save it again"
                )
            if meta["dtype"] not in SAFETENSORS_DTYPES:
                raise CheckpointError(
                    f"{path}: {stored} has dtype {meta['dtype']}, which flexlab cannot read; "
                    f"known: {', '.join(SAFETENSORS_DTYPES)}"
                )
            self._locations[(path, stored)] = TensorLocation(
                path, data_start + begin, end - begin, SAFETENSORS_DTYPES[meta["dtype"]], tuple(meta["shape"])
            )
            names.append(stored)
        return names

    def _index_bin(self, path: Path) -> list[str]:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            raise CheckpointError(
                f"{path} cannot be read as a PyTorch checkpoint ({e}); it may be truncated: download or save it again"
            ) from None
        except Exception as e:  # weights_only refuses pickled objects other than tensors
            raise CheckpointError(
                f"{path} holds more than tensors and flexlab will not unpickle it "
                f"({type(e).__name__}); convert it to safetensors"
            ) from None
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise CheckpointError(
                f"{path} is not a state dict of named tensors; save the model's state_dict() "
                "(or convert it to safetensors)"
            )
        self._handles[path] = state
        return list(state)

    def location(self, name: str) -> TensorLocation | None:
        return self._locations.get(self._file_of[name])

    def maps(self, name: str) -> bool:
        return self._file_of[name][0].suffix != ".safetensors"  # .bin files are mapped; safetensors read

    def _read(self, name: str) -> torch.Tensor:
        path, stored = self._file_of[name]
        if path.suffix != ".safetensors":
            return self._handles[path][stored]
        # Read into a tensor of its own: a map's pages would count beside the copy the engine
        # keeps (twice the tensor at once), and would be faulted in again under memory pressure.
        loc = self._locations[(path, stored)]
        t = torch.empty(loc.shape, dtype=loc.dtype)
        view = t.reshape(-1).view(torch.uint8).numpy().data
        with open(path, "rb", buffering=0) as f:
            f.seek(loc.offset)
            done = 0
            while done < loc.nbytes:  # a read returns at most ~2 GiB at a time
                n = f.readinto(view[done:])
                if not n:
                    raise CheckpointError(f"{path} ended while reading {stored}; download or save it again")
                done += n
        self._read_from.add(path)
        return t

    def close(self) -> None:
        self._handles.clear()

    def release_pages(self) -> None:
        """Drop the pages of the safetensors files read so far from the page cache: under a
        memory limit (which charges them) they would otherwise be reclaimed under load."""
        paths, self._read_from = sorted(self._read_from), set()
        for path in paths:
            if hasattr(os, "posix_fadvise"):
                fd = os.open(path, os.O_RDONLY)
                try:
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                finally:
                    os.close(fd)


def _read_safetensors_header(path: Path) -> tuple[dict, int]:
    """The JSON header of a safetensors file and the offset where its data starts."""
    try:
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            if length > 100_000_000:
                raise ValueError("header length is implausible")
            header = json.loads(f.read(length))
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
    except (struct.error, ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(
            f"{path} is not a readable safetensors file ({e}); it may be truncated or "
            "corrupt: download or save it again"
        ) from None
    return header, 8 + length


def _weight_files(directory: Path) -> list[Path]:
    """The weight files of a checkpoint directory, preferring safetensors; checks the index."""
    for name in _WEIGHT_FILES:
        path = directory / name
        if not path.exists():
            continue
        if not name.endswith(".index.json"):
            return [path]
        try:
            weight_map = json.loads(path.read_text())["weight_map"]
            files = {str(f) for f in weight_map.values()}
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(
                f"{path} is not a valid shard index ({type(e).__name__}: {e}); it needs "
                '{"weight_map": {tensor name: shard file}}'
            ) from None
        inside = directory.resolve()
        escaping = sorted(f for f in files if inside not in (directory / f).resolve().parents)
        if escaping:  # a checkpoint reads its own files only, never a path it names elsewhere
            raise CheckpointError(
                f"{path} names shard(s) outside {directory}: {', '.join(escaping[:3])}; an index "
                "may only name files in its own directory"
            )
        shards = sorted({directory / f for f in files})
        absent = [s.name for s in shards if not s.exists()]
        if absent:
            raise CheckpointError(
                f"{directory}: shard(s) listed in {name} are missing: {', '.join(absent)}; "
                "download or copy them into the directory"
            )
        return shards
    raise CheckpointError(f"{directory} has no weights: expected one of {', '.join(_WEIGHT_FILES)}")


def read_hf_config(directory: Path) -> dict:
    path = directory / "config.json"
    if not path.exists():
        raise CheckpointError(f"{directory} has no config.json; pass a directory written by save_pretrained")
    try:
        hf = json.loads(path.read_text())
    except (ValueError, OSError) as e:
        raise CheckpointError(f"{path} is not readable JSON ({e}); it may be truncated") from None
    if not isinstance(hf, dict):
        raise CheckpointError(f"{path} holds a JSON {type(hf).__name__}, not an object of config fields")
    if hf.get("quantization_config"):  # e.g. float8 weights with separate scales: a cast would be wrong
        method = (
            hf["quantization_config"].get("quant_method", "?") if isinstance(hf["quantization_config"], dict) else "?"
        )
        raise CheckpointError(
            f"{path}: a pre-quantized checkpoint (quantization_config, method {method!r}) is not "
            "supported; use the unquantized checkpoint (flexlab compresses weights itself with "
            "Policy(compress_weight=...))"
        )
    return hf


def generation_eos_ids(directory: Path) -> tuple[int, ...]:
    """The end-of-sequence ids ``generation_config.json`` lists, if the checkpoint has one
    (instruct models often end a turn with an id that ``config.json`` does not name)."""
    path = directory / "generation_config.json"
    if not path.exists():
        return ()
    try:
        value = json.loads(path.read_text()).get("eos_token_id")
    except (ValueError, OSError, AttributeError) as e:
        raise CheckpointError(f"{path} is not a readable JSON object ({e}); fix or delete it") from None
    values = value if isinstance(value, list) else [value]
    if not all(isinstance(v, int) or v is None for v in values):
        raise CheckpointError(f"{path}: eos_token_id={value!r} must be an int or a list of ints")
    return tuple(v for v in values if v is not None)


_HUB_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?$")


def resolve_checkpoint(name_or_path: str | os.PathLike) -> Path:
    """A local checkpoint directory for a path or a Hugging Face hub id (downloading if needed)."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"{path} is a file; pass the directory that holds config.json and the weights")
    text = str(name_or_path)
    if not _HUB_ID.match(text) or text.startswith("."):
        raise CheckpointError(f"checkpoint directory {text!r} does not exist")
    return _download(text)


def _download(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    small = ["*.json", "*.txt", "*.model"]
    try:
        local = Path(snapshot_download(repo_id, allow_patterns=small + ["*.safetensors"]))
        if not any((local / f).exists() for f in _WEIGHT_FILES):  # older repos ship only .bin
            local = Path(snapshot_download(repo_id, allow_patterns=small + ["*.bin"]))
    except Exception as e:  # offline, unknown repo, gated repo: all end the same way for the user
        raise CheckpointError(
            f"{repo_id!r} is not a local directory and could not be fetched from the Hugging Face hub "
            f"({type(e).__name__}). If this machine is offline, download it where there is a network "
            f"(`hf download {repo_id} --local-dir DIR`), copy DIR here and pass its path"
        ) from None
    return local
