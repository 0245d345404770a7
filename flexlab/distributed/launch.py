"""Starting a pipeline: N local processes (for notebooks and ``flexlab generate --pipeline N``), or
the processes ``torchrun`` started (``torchrun --nproc-per-node N -m flexlab generate ...``).

Either way each process joins one ``torch.distributed`` process group (gloo on CPUs, NCCL when
every rank has a GPU) with a timeout on every message, and runs :func:`~flexlab.distributed.stage.run_rank`.

Faults: a rank that raises reports its error and leaves; its neighbours' messages then fail at
once (the connection closes), and so does every rank in turn. The local launcher reports the
first rank's own error (not the "peer closed" errors it set off), ends every process still
running, and removes the directory all ranks' offload files are in — also when a rank was killed
outright and could not clean up itself.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import pickle
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist

from flexlab import hugepages
from flexlab.distributed.stage import PipelineJob, rank_device, run_rank
from flexlab.engine.pipeline import PipelineError
from flexlab.files import owned_dir, remove, sweep_stale

SCRATCH_PREFIX = "flexlab-pipeline-"
_PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "Broken pipe")


def run_job(job: PipelineJob, ranks: tuple[int, int] | None = None):
    """Rank 0's result of ``job``: from local processes started here (``ranks`` None), or as the
    rank ``ranks = (rank, world)`` that torchrun started this process as (None on every rank but
    0); the process group is left after."""
    if ranks is None:
        return run_local(job)
    try:
        result = run_rank(job, *ranks)
    except BaseException as e:
        print(f"flexlab: error: pipeline rank {ranks[0]} failed: {type(e).__name__}: {e}", file=sys.stderr)
        _leave_now(1)
    dist.destroy_process_group()
    return result


def _leave_now(status: int) -> None:
    """End a failed rank's process at once. Its neighbours may be waiting on it (and its own
    hand-off threads on them): only its exit, which closes its connections, frees them all. Its
    engine has removed its files already (the ``with`` block closed before the error got here)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def run_local(job: PipelineJob, *, startup_s: float = 120.0):
    """Run ``job`` in ``job.plan.num_ranks`` local processes and return rank 0's result.

    ``job.timeout_s``: the longest any rank waits for a neighbour (a hung peer ends the run with
    an error after it); ``startup_s``: the longest for every process to start.
    """
    import multiprocessing as mp

    gpus = torch.cuda.device_count() if job.source.device_type == "cuda" else job.plan.num_ranks
    if gpus < job.plan.num_ranks:  # each local rank takes the GPU of its number
        raise PipelineError(
            f"a pipeline of {job.plan.num_ranks} stages on CUDA needs a GPU per stage, and this machine has {gpus}; "
            "run the stages on the CPU (a model loaded with device='cpu'), or use fewer stages"
        )
    parent = Path(job.offload_dir).expanduser() if job.offload_dir else Path(tempfile.gettempdir())
    parent.mkdir(parents=True, exist_ok=True)
    sweep_stale(parent, SCRATCH_PREFIX)
    scratch = owned_dir(parent, SCRATCH_PREFIX)  # every rank's offload files, removed below
    job = dataclasses.replace(job, offload_dir=str(scratch))
    ctx = mp.get_context("spawn")  # a fresh interpreter per rank: no forked threads or CUDA state
    address = f"tcp://127.0.0.1:{_free_port()}"
    pipes = [ctx.Pipe(duplex=False) for _ in range(job.plan.num_ranks)]  # (read end, write end) per rank
    procs = [
        ctx.Process(
            target=_rank_main,
            args=(job, r, len(pipes), address, pipes[r][1]),
            name=f"flexlab-stage-{r}",
            daemon=True,
        )
        for r in range(len(pipes))
    ]
    try:
        with hugepages.for_children():  # its torch is not loaded yet: its large tensors on huge pages
            for p, (_, write) in zip(procs, pipes):
                p.start()
                write.close()  # the child holds it now: its end of file is the child's
        return _collect(procs, [read for read, _ in pipes], job.timeout_s + startup_s)
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()  # SIGTERM: its engine removes its files (flexlab.files)
        for p in procs:
            p.join(5)
            if p.is_alive():
                p.kill()
                p.join()
        for read, _ in pipes:
            read.close()
        remove(scratch)


def _collect(procs, reads, patience_s: float):
    """Rank 0's result, or a PipelineError naming the rank that failed first."""
    from multiprocessing.connection import wait

    pending = dict(enumerate(reads))
    errors: dict[int, str] = {}
    result, last_news = None, time.monotonic()
    while pending:
        ready = wait(list(pending.values()), timeout=0.5)
        now = time.monotonic()
        for r in [r for r, conn in pending.items() if conn in ready]:
            try:
                kind, payload = pickle.loads(pending.pop(r).recv_bytes())
            except EOFError:  # it died without a word: killed, or out of memory
                procs[r].join(1)  # its exit code is known a moment after its pipe closes
                kind, payload = "error", f"the process died (exit code {procs[r].exitcode})"
            last_news = now
            if kind == "error":
                errors[r] = payload
            elif r == 0:
                result = payload
        if errors and now - last_news > 2.0:
            break  # the others have had time to report how the failure reached them
        if not ready and now - last_news > patience_s:
            raise PipelineError(f"no stage reported for {patience_s:.0f} s; ended every stage")
    if errors:
        own = [r for r, e in sorted(errors.items()) if not any(s in e for s in _PEER_GONE)]
        rank = (own or sorted(errors))[0]
        raise PipelineError(f"pipeline stage {rank} failed: {errors[rank]}")
    return result


def _report(conn, kind: str, payload) -> None:
    """Send a rank's word to the parent by value. (``Connection.send`` would share a result's
    tensors by file descriptors that only live while this process does: it exits right after,
    and the parent's unpickling then failed now and then, ``FileNotFoundError``.)"""
    conn.send_bytes(pickle.dumps((kind, payload)))


def _rank_main(job: PipelineJob, rank: int, world: int, address: str, report) -> None:
    """A local process's life: join the group, run the rank, report, leave."""
    from tqdm.auto import tqdm

    tqdm.set_lock(threading.RLock())  # not tqdm's default process-shared lock, which outlives the process
    try:
        backend = "nccl" if rank_device(job.source).type == "cuda" else "gloo"
        if backend == "nccl":
            os.environ.setdefault("LOCAL_RANK", str(rank))
            torch.cuda.set_device(rank_device(job.source))
        dist.init_process_group(
            backend, init_method=address, rank=rank, world_size=world, timeout=datetime.timedelta(seconds=job.timeout_s)
        )
        _report(report, "ok", run_rank(job, rank, world))
    except BaseException as e:
        _report(report, "error", f"{type(e).__name__}: {e}".strip())
        report.close()  # sent before this process's sockets close: its own error arrives first
        _leave_now(1)
    report.close()
    dist.destroy_process_group()


def init_from_torchrun(timeout_s: float = 300.0) -> tuple[int, int] | None:
    """Join the process group ``torchrun`` set up (its RANK/WORLD_SIZE/MASTER_* variables);
    returns ``(rank, world size)``, or None when this process was not started by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world < 2 or "RANK" not in os.environ:
        return None
    if not dist.is_initialized():
        cuda = torch.cuda.is_available() and torch.cuda.device_count() > 0
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=timeout_s))
    return dist.get_rank(), dist.get_world_size()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
