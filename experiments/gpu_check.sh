#!/usr/bin/env bash
# The GPU check in one short run: the CUDA tests, then the GPU benchmarks, most important first,
# each under its own time limit so that one slow step cannot eat the rest. Everything it writes
# lands in $OUT (default ./gpu_check_out): log.txt, the tests' junit XML, and results.tar.gz with
# every benchmark's CSV/JSON (re-packed after each step, so a run stopped early still returns what
# it finished). Uses the python3 on the PATH with the repository on PYTHONPATH (no install: a lent
# GPU machine has torch and transformers but no package index).
#
#     bash experiments/gpu_check.sh              # on a machine with a CUDA GPU (~8 minutes)
#     SMOKE=1 bash experiments/gpu_check.sh      # the same steps at toy sizes (checks the script on a CPU)
#     FROM=2 bash experiments/gpu_check.sh       # from step 2 on (a rerun after the tests passed)
set -u
OUT=${OUT:-$PWD/gpu_check_out}
WORK=$OUT/work
mkdir -p "$WORK"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 MPLBACKEND=Agg TOKENIZERS_PARALLELISM=false
PY=${PY:-python3}
exec > >(tee -a "$OUT/log.txt") 2>&1

FROM=${FROM:-1}
step() {  # step SECONDS COMMAND...: run with a limit, report its status and time, re-pack the results
    local limit=$1 start=$SECONDS
    shift
    echo "== $(date +%T) [limit ${limit}s] $*"
    timeout --kill-after=5 "$limit" "$@"
    echo "== rc=$? after $((SECONDS - start))s"
    tar -czf "$OUT/results.tar.gz" -C "$WORK" .
}

if [ "${SMOKE:-0}" = 1 ]; then
    BIG=opt-125m; SHAPE="--prompt-len 32 --gen-len 4 --gpu-batch-size 4 --num-gpu-batches 2"; QUICK=--quick
else
    BIG=opt-1.3b; SHAPE="--prompt-len 256 --gen-len 8 --gpu-batch-size 16 --num-gpu-batches 2"; QUICK=
fi

nvidia-smi -L 2>/dev/null || echo "no nvidia-smi"
$PY -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__,
'cuda', torch.cuda.is_available() and torch.cuda.get_device_name())"

# 1. Exactness on CUDA: the engine's 14-policy grid, compression, sparse attention, every family.
[ "$FROM" -le 1 ] && step 210 $PY -m pytest tests/gpu -q -p no:cacheprovider -rs --junitxml="$WORK/gpu_tests.xml"
# 2. The cost model on a GPU, for the first time: calibrate (CUDA's runtime base too), then predict
#    and measure 14 policies.
[ "$FROM" -le 2 ] && step 60 $PY -m flexlab calibrate $QUICK --out "$WORK/hardware_cuda.json"
[ "$FROM" -le 2 ] && step 150 $PY experiments/validate_cost_model.py --preset $BIG $SHAPE --repeats 1 \
    --hardware "$WORK/hardware_cuda.json" --out-dir "$WORK"
# 3. The resident engine against the reference path and transformers (issue 21: 22% on an H100).
[ "$FROM" -le 3 ] && step 110 $PY experiments/reference_throughput.py --preset $BIG --batch 16 --prompt-len 128 --gen-len 32 \
    --repeats 3 --out-dir "$WORK"
[ "$FROM" -le 3 ] && step 70 $PY experiments/reference_throughput.py --preset $BIG --batch 1 --prompt-len 128 --gen-len 32 \
    --repeats 3 --out-dir "$WORK"
# 4. Host overhead per step on the GPU (tiny model: the maths is negligible).
[ "$FROM" -le 4 ] && step 50 $PY experiments/engine_overhead.py --repeats 3 --gen-len 16 --out-dir "$WORK"
echo "== done $(date +%T), ${SECONDS}s"
