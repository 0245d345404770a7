"""Every experiment script runs end to end on a tiny model and writes its CSV and JSON."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[2]

RUNS = {
    "reference_throughput": ["--preset", "opt-tiny", "--repeats", "1", "--prompt-len", "8", "--gen-len", "4"],
    "policy_sweep": ["--preset", "opt-tiny", "--prompt-len", "8", "--gen-len", "3", "--gpu-batch-size", "2"],
    "disk_offload_decode": [
        "--preset",
        "opt-tiny",
        "--prompt-len",
        "8",
        "--gen-len",
        "3",
        "--gpu-batch-size",
        "2",
        "--num-gpu-batches",
        "2",
        "--dd-mb",
        "16",
    ],
    "ablate_compression": ["--model", "opt-tiny", "--smoke", "true", "--gpu-batch-size", "2"],
    "compare_baselines": ["--quick", "true"],
    "pipeline_scaling": ["--preset", "opt-tiny", "--rounds", "1", "--prompt-len", "8", "--gen-len", "3"]
    + ["--gpu-batch-size", "2", "--num-gpu-batches", "2", "--dd-mb", "16"],
    "validate_cost_model": [
        "--preset",
        "opt-tiny",
        "--smoke",
        "true",
        "--prompt-len",
        "8",
        "--gen-len",
        "3",
        "--gpu-batch-size",
        "2",
    ],
    "flexgen_published": ["--search", "false"],  # predictions only (the search is tested elsewhere)
    "engine_overhead": ["--preset", "opt-tiny", "--repeats", "1", "--gen-len", "3"],
    "validate_memory": ["--smoke", "true"],  # three rows, opt-125m-shaped: ~25 s
    "pipeline_prediction": ["--preset", "opt-tiny", "--stages", "1,2", "--prompt-len", "8", "--gen-len", "4"],
    "checkpoint_dtype": ["--preset", "opt-tiny", "--rounds", "1", "--prompt-len", "8", "--gen-len", "3"]
    + ["--gpu-batch-size", "2", "--num-gpu-batches", "2"],
    "streamed_head": ["--preset", "opt-tiny", "--rounds", "1", "--sequences", "2", "--prompt-len", "8"]
    + ["--gen-len", "3"],
    "allocator_modes": ["--row", "all resident", "--repeats", "1", "--gen-len", "3"]
    + ["--modes", "default,fixed16,lean+thp"],
    "embedding_rows": ["--presets", "opt-tiny,codegen-tiny", "--repeats", "1", "--gen-len", "3", "--label", "smoke"],
}


# these would each calibrate on their own (~25 s); they read the session's one profile instead
CALIBRATING = {"compare_baselines", "pipeline_scaling", "validate_cost_model"}


@pytest.mark.parametrize("script", list(RUNS))
def test_experiment_runs_and_writes_results(script, tmp_path, request):
    args = [sys.executable, str(ROOT / "experiments" / f"{script}.py"), "--out-dir", str(tmp_path), *RUNS[script]]
    if script in CALIBRATING:  # the session's calibration (tested in test_cli) instead of one of their own
        args += ["--hardware", str(request.getfixturevalue("quick_profile")[0])]
    if script == "disk_offload_decode":
        args += ["--offload-dir", str(tmp_path)]
    if script == "pipeline_scaling":
        args += ["--work-dir", str(tmp_path)]
    done = subprocess.run(args, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    csv = next(tmp_path.glob(f"{script}_*.csv"))
    df = pd.read_csv(csv)
    assert len(df) >= 2
    assert "error" not in df or df.error.isna().all(), df.error.dropna().tolist()  # e.g. a baseline that failed
    if script == "compare_baselines":  # every flexlab row says how busy its compute lane was
        share = df[df.system == "flexlab"].compute_busy_share
        assert len(share) and share.between(0, 1).all(), share.tolist()
    meta = json.loads(csv.with_suffix(".json").read_text())
    config = meta["config"]
    assert "date" in meta
    if script == "flexgen_published":  # FlexGen's published rows, each predicted by both models
        assert (df.published_tok_s > 0).all() and (df.flexlab_model_tok_s > 0).all() and df.fits.all()
        return
    if script == "validate_cost_model":  # the disk rate the engine's reads saw: only where it read the disk
        saw = df.set_index("policy").engine_disk_read_GB_s
        assert saw["weights 50% disk"] > 0 and saw[["all on gpu", "weights 50% cpu"]].isna().all(), saw
    if script == "checkpoint_dtype":  # converted once into a dtype of the same size or a narrower one
        size = {"float16": 2, "bfloat16": 2, "float32": 4}
        compute = meta["compute_dtype"].removeprefix("torch.")
        own = df.groupby("checkpoint").own_files.all().to_dict()
        assert own == {d: d != compute and size[d] >= size[compute] for d in size}, (compute, own)
    if script == "validate_memory":  # the process's peak as predicted (10% here; slack for other machines)
        assert (df.relative_error.abs() < 0.2).all(), df[["row", "measured_peak_MiB", "predicted_peak_MiB"]]
        return
    if script == "allocator_modes":  # each mode ran, and malloc handed out less than was resident at the peak
        assert df["mode"].tolist() == ["default", "fixed16", "lean+thp"], df  # three fresh processes
        assert (df.malloc_handed_out_MiB > df.tracked_MiB).all() and (df.seconds > 0).all(), df
        return
    if script == "embedding_rows":  # a decode token reads a few rows of the table, and loads the rest
        assert (df.read_rows_MB > 0).all() and (df.load_weight_MB > 10 * df.read_rows_MB).all(), df
        return
    assert config.get("preset", config.get("model")) == "opt-tiny"
