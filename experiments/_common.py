"""What every experiment script shares: a command line from its Config, and tidy result files."""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import time
import uuid
from dataclasses import asdict
from pathlib import Path

import pandas as pd

from flexlab import hugepages

# As the flexlab command does: torch's large CPU tensors on huge pages, in this process and the ones
# it starts, where torch is not loaded yet (scripts that import torch first run without; each
# result's JSON says which).
hugepages.enable_before_torch()

import torch  # noqa: E402


def parse_config(config_cls, doc: str | None):
    """A ``--field value`` option for each field of the dataclass ``config_cls``."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    for field, default in asdict(config_cls()).items():
        kind = (lambda v: v.lower() in ("1", "true", "yes")) if isinstance(default, bool) else type(default)
        parser.add_argument("--" + field.replace("_", "-"), type=kind, default=default)
    return config_cls(**vars(parser.parse_args()))


def cpu_dtype(name: str) -> torch.dtype:
    """The dtype a ``dtype`` field names; ``"auto"``: the CPU's fast one (bfloat16 where it has
    native kernels, else float32: emulated bfloat16 is ~100x slower, see flexlab.devices)."""
    from flexlab.devices import default_dtype

    return default_dtype(torch.device("cpu")) if name == "auto" else getattr(torch, name)


def write_results(df: pd.DataFrame, cfg, stem: str, **meta) -> Path:
    """``<out_dir>/<stem>.csv`` (the table) and ``<stem>.json`` (config, machine, date, extras)."""
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    df.to_csv(out / f"{stem}.csv", index=False)
    cuda = torch.cuda.is_available()
    meta = dict(
        config=asdict(cfg),
        date=time.strftime("%Y-%m-%d"),
        torch=torch.__version__,
        device=torch.cuda.get_device_name() if cuda else f"cpu ({platform.machine()})",
        cpu_threads=torch.get_num_threads(),
        huge_pages=os.environ.get(hugepages.VARIABLE) == "1",  # THP_MEM_ALLOC_ENABLE as torch saw it here
        **meta,
    )
    (out / f"{stem}.json").write_text(json.dumps(meta, indent=2, default=str))
    return out


def policy_from(percent: list[float], extra: dict, **fields):
    """A Policy from FlexGen's six shares plus fields; ``compress_*`` given as QuantConfig dicts."""
    import flexlab

    extra = {k: flexlab.QuantConfig.from_dict(v) if k.startswith("compress") else v for k, v in extra.items()}
    return flexlab.Policy.from_percent(percent, **fields, **extra)


def dd_direct_bandwidth(directory: Path, size_mb: int = 1024) -> float:
    """GB/s that ``dd iflag=direct`` (the page cache bypassed) reads from a fresh file in ``directory``."""
    path = Path(directory) / "dd-probe.bin"
    try:
        with open(path, "wb") as f:
            for _ in range(max(1, size_mb // 16)):
                f.write(os.urandom(16 << 20))
            f.flush()
            os.fsync(f.fileno())
        out = subprocess.run(
            ["dd", f"if={path}", "of=/dev/null", "bs=16M", "iflag=direct"], capture_output=True, text=True, check=True
        ).stderr
        seconds = float(re.search(r"copied, ([\d.]+) s", out).group(1))
        return max(1, size_mb // 16) * 16 * 2**20 / seconds / 1e9
    finally:
        path.unlink(missing_ok=True)


# ---- memory limits for the baseline comparisons ----------------------------------------------
def cgroup_for(limit_bytes: int | None) -> tuple[Path | None, str]:
    """A fresh memory cgroup limited to ``limit_bytes`` (v1 or v2), or None and why not."""
    if limit_bytes is None:
        return None, "no limit"
    if os.geteuid() != 0:
        return None, "not root: memory NOT limited, page cache not controlled"
    name = f"flexlab-bench-{uuid.uuid4().hex[:8]}"
    v2 = Path("/sys/fs/cgroup/cgroup.controllers")
    try:
        if v2.exists() and "memory" in v2.read_text():
            path = Path("/sys/fs/cgroup") / name
            path.mkdir()
            (path / "memory.max").write_text(str(limit_bytes))
            (path / "memory.swap.max").write_text("0") if (path / "memory.swap.max").exists() else None
        else:
            path = Path("/sys/fs/cgroup/memory") / name
            path.mkdir()
            (path / "memory.limit_in_bytes").write_text(str(limit_bytes))
            if (path / "memory.memsw.limit_in_bytes").exists():  # no escaping into swap
                (path / "memory.memsw.limit_in_bytes").write_text(str(limit_bytes))
        return path, f"cgroup memory limit {limit_bytes / 1e9:.2f} GB (page cache charged to it)"
    except OSError as e:
        return None, f"no cgroup ({e.strerror}): memory NOT limited, page cache not controlled"


def drop_page_cache() -> bool:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3")
        return True
    except OSError:
        return False
