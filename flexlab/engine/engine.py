"""``flexlab.Engine``: generation with weights, KV cache and activations placed by a Policy.

    >>> import flexlab, torch
    >>> model = flexlab.Model.from_config("opt-tiny", seed=0, dtype=torch.float32)
    >>> policy = flexlab.Policy(w_gpu_percent=20, w_cpu_percent=30, gpu_batch_size=2, num_gpu_batches=2)
    >>> with flexlab.Engine(model, policy) as engine:           # files and threads go away on exit
    ...     result = engine.generate([[2, 5, 6], [2, 7]], max_new_tokens=4)
    >>> result.token_ids == model.generate([[2, 5, 6], [2, 7]], max_new_tokens=4).token_ids
    True

The engine owns its lanes (threads, CUDA streams), staging buffers and offload files, and
releases them on ``close()`` — also after an exception or Ctrl-C inside the ``with`` block.
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
from pathlib import Path

from flexlab.devices import available_memory, resident_bytes
from flexlab.engine.block import BlockRun
from flexlab.engine.context import BlockContext, Peers
from flexlab.engine.executor import Executor
from flexlab.engine.footprint import footprint
from flexlab.engine.heads import GenerateHead, Head, ScoreHead, TeacherHead
from flexlab.engine.memory_guard import MemoryGuard
from flexlab.engine.placement import reads_in_place
from flexlab.engine.policy import Policy, PolicyError
from flexlab.engine.schedule import make_stages, share_of
from flexlab.engine.stage_cost import checkpoint_itemsize
from flexlab.engine.store import WeightStore
from flexlab.engine.tiers import DiskFiles, MemoryTracker, return_freed_memory
from flexlab.errors import FlexlabError, OffloadError
from flexlab.files import owned_dir, remove, sweep_stale
from flexlab.models.family import specs_by_part
from flexlab.models.generation import (
    GenerationResult,
    Sampler,
    encode_for_scoring,
    generation_metrics,
    prepare_generation,
)
from flexlab.models.layers import packs
from flexlab.models.loading import RandomWeights
from flexlab.models.registry import weight_bytes
from flexlab.timeline import MemorySample, Timeline

OFFLOAD_PREFIX = "flexlab-"  # each engine's directory inside offload_dir: flexlab-XXXXXXXX


class Engine:
    """Runs a :class:`~flexlab.Model` under a :class:`Policy`; see the module docstring."""

    def __init__(
        self,
        model,
        policy: Policy | None = None,
        offload_dir: str | Path | None = None,
        *,
        direct_io: bool = True,
        progress: bool = False,
        layers: range | None = None,
        peers: Peers | None = None,
        groups: int = 1,
        memory_limit: float | None = None,
        pack_weights: bool = True,
    ) -> None:
        """``memory_limit``: bytes of host RAM the whole process may use (default: its cgroup's
        limit when one is set, else the memory available now plus what the process holds;
        ``math.inf``: no check). A policy whose predicted peak
        (:class:`~flexlab.engine.footprint.Footprint`: what the process holds now, plus the
        engine's bytes, workspace and allocator slack) exceeds it is refused with
        :class:`~flexlab.errors.MemoryLimitError` before anything is allocated: here for placing
        the weights, and in each :meth:`generate` or :meth:`score` for its shapes. Where only
        glibc's slack would break the limit the engine makes the allocator lean
        (:func:`~flexlab.engine.footprint.lean_allocator`) and warns.

        ``layers``, ``peers`` and ``groups`` make the engine one rank of a pipeline (see
        :mod:`flexlab.distributed`, which builds them): it holds and runs only those layers (with
        the embedding if they start at 0, the head if they end at the last), hands hidden states
        and next tokens to its neighbours through ``peers``, and runs the block's batches in
        ``groups`` that take turns, so that the ranks work on different groups at once. A rank's
        ``memory_limit`` is its machine's, which the ranks on it share (default: the cgroup's
        limit, else what is available plus what they hold): each is held to a share in
        proportion to its predicted peak (:mod:`flexlab.engine.memory_guard`).

        ``pack_weights``: on a CPU computing in bfloat16, hold the matrices kept in memory in
        oneDNN's layout (:func:`~flexlab.models.layers.packed`: bit-identical products, 1.7-2.1x
        faster at a decode's few rows); False keeps them as the reference path holds them."""
        policy = policy or Policy()
        if not isinstance(policy, Policy):
            raise PolicyError(f"policy must be a flexlab.Policy, got {type(policy).__name__}")
        self.model, self.policy = model, policy
        self.device, self.dtype = model.device, model.dtype
        self.stages = make_stages(model.config.num_layers, policy.sep_layer)
        if layers is not None:
            self.stages = share_of(self.stages, layers, model.config.num_layers)
        self.peers = peers
        self.layers = layers
        self.memory_limit = available_memory() if memory_limit is None and peers is None else memory_limit
        self._base = resident_bytes() or 0  # the process before the engine: the runtime base
        self._guard = MemoryGuard(self.memory_limit, None if peers is None else peers.memory_share)
        self._packs = pack_weights and packs(self.device, self.dtype)
        self._check_memory(1, 1, 1)  # the weights (and a one-token run)
        self.tracker = MemoryTracker()
        self.files = DiskFiles(direct=direct_io)
        self._dir: Path | None = None
        self._executor: Executor | None = None
        self._broken = False
        try:
            self._dir = self._make_offload_dir(offload_dir)
            self._check_space_for_weights()
            from tqdm.auto import tqdm

            by_part = specs_by_part(model.family.weight_specs(model.config))
            n = len({w.name for s in self.stages for p in s.parts for w in by_part.get((p, s.layer), [])})
            with tqdm(total=n, desc="placing weights", disable=not progress, leave=False) as bar:
                self.weights = WeightStore(
                    model,
                    self.stages,
                    policy,
                    self.device,
                    self.dtype,
                    self.subdir("weights"),
                    self.files,
                    self.tracker,
                    bar,
                    pack=self._packs,
                )
            names = {s.index: s.name for s in self.stages}
            self._executor = Executor(self.device, policy.overlap, describe=names.__getitem__)
            self._context = BlockContext(
                model.family,
                model.config,
                policy,
                self.stages,
                self.device,
                self.dtype,
                self.weights,
                self._executor,
                self.tracker,
                self.files,
                self.subdir,
                self.check_space,
                peers,
                groups,
            )
        except BaseException:
            self.close()
            raise

    # ---- resources ---------------------------------------------------------------------
    def _make_offload_dir(self, offload_dir) -> Path:
        """A fresh directory the engine owns (inside ``offload_dir`` when given) and removes on close."""
        parent = Path(offload_dir).expanduser() if offload_dir is not None else Path(tempfile.gettempdir())
        try:
            parent.mkdir(parents=True, exist_ok=True)
            sweep_stale(parent, OFFLOAD_PREFIX)  # left by engines whose process was killed
            return owned_dir(parent, OFFLOAD_PREFIX)
        except OSError as e:
            raise OffloadError(
                f"offload_dir {str(parent)!r} is not usable ({e.strerror}); pass a writable "
                "directory with room for the disk share of weights and cache"
            ) from None

    def subdir(self, name: str) -> Path:
        """A folder (created if needed) inside the engine's offload directory."""
        assert self._dir is not None, "an offload folder asked of a closed Engine"
        path = self._dir / name
        path.mkdir(exist_ok=True)
        return path

    def _check_space_for_weights(self) -> None:
        # Safetensors checkpoints are read in place (see reads_in_place); other sources are
        # converted into offload_dir.
        loc = self.model.weights.location(next(iter(self.model.weights.specs)))
        in_place = loc is not None and reads_in_place(loc.dtype, self.dtype, self.device.type == "cuda")
        share = self.policy.w_disk_percent / 100
        need = 0 if in_place else share * weight_bytes(self.model.config, self.dtype.itemsize)
        what = "the disk share of the weights"
        if loc is not None and not in_place:  # a copy in the compute dtype, to spare a conversion per read
            dtype = str(self.dtype).removeprefix("torch.")
            what += (
                f" (converted once from the checkpoint's {str(loc.dtype).removeprefix('torch.')} to {dtype}; "
                f"`flexlab convert DIR OUT --dtype {dtype}` stores a checkpoint read in place instead)"
            )
        self.check_space(need, what)

    def check_space(self, need: float, what: str) -> None:
        """Raise OffloadError, before anything is written, if the offload disk lacks ``need`` bytes."""
        assert self._dir is not None, "disk space asked of a closed Engine"
        free = shutil.disk_usage(self._dir).free
        if need > free:
            raise OffloadError(
                f"offload_dir {str(self._dir.parent)!r} has {free / 2**30:.2f} GiB free but "
                f"{what} needs {need / 2**30:.2f} GiB; free space, choose another directory, "
                "or lower the disk share in the policy"
            )

    def _check_memory(self, prompt_len: int, gen_len: int, num_prompts: int) -> None:
        """Refuse a run whose predicted host peak exceeds :attr:`memory_limit` (see ``__init__``)."""
        if not self._guard.active:
            return
        fp = footprint(
            self.model.config,
            self.policy,
            on_cuda=self.device.type == "cuda",
            itemsize=self.dtype.itemsize,
            prompt_len=min(prompt_len, self.model.config.max_positions),
            gen_len=gen_len,
            num_prompts=num_prompts,
            layers=self.layers,
            checkpoint_itemsize=checkpoint_itemsize(self.model),
            runtime_base=self._base,
            random_weights=isinstance(self.model.weights, RandomWeights),
            packs=self._packs,
        )
        self._guard.check(fp)

    def close(self) -> None:
        """Stop the lanes, drop the stores and delete every file the engine created."""
        if self._executor is not None:
            self._executor.close()
            self._executor = None
        self.files.close()
        if self._dir is not None:
            remove(self._dir)
            self._dir = None
        # The placed weights go now, not when the Engine object does (a closed Engine reads neither).
        self.weights = self._context = None  # type: ignore[assignment]
        return_freed_memory()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:  # a forgotten close() must not leak files
        try:
            self.close()
        except Exception:
            pass

    # ---- user API ----------------------------------------------------------------------
    def generate(
        self,
        prompts,
        *,
        max_new_tokens: int = 32,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        stop_token_ids=(),
        stop_strings=None,
        progress: bool = False,
    ) -> GenerationResult:
        """Generate for any number of prompts, in blocks of ``gpu_batch_size × num_gpu_batches``.

        Arguments as :meth:`flexlab.Model.generate`; ``progress``: a bar over the new tokens. With
        sampling, the same seed gives the same tokens from run to run, though not the reference
        path's tokens (batches draw in turn).
        """
        executor = self._check_open()
        ids, sampling, stop = prepare_generation(
            prompts,
            self.model.tokenizer,
            self.model.config,
            max_new_tokens=max_new_tokens,
            do_sample=do_sample,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            seed=seed,
            stop_token_ids=stop_token_ids,
            stop_strings=stop_strings,
        )
        sampler = Sampler(sampling, self.device)
        executor.restart_clock()
        self.tracker.reset_peaks()
        generated: list[list[int]] = [[] for _ in ids]
        events, prefill_s, decode_s = [], 0.0, 0.0
        from tqdm.auto import tqdm

        with (
            self.tracker.recording(executor.clock.base_wall) as memory,
            tqdm(total=len(ids) * max_new_tokens, desc="generating", unit="tok", disable=not progress) as bar,
        ):
            for first in range(0, len(ids), self.policy.block_size):
                head = GenerateHead(
                    ids[first : first + self.policy.block_size],
                    self.policy.gpu_batch_size,
                    max_new_tokens,
                    sampler=sampler,
                    stop=stop,
                    generated=generated,
                    offset=first,
                    on_token=bar.update,
                )
                block_events, p, d = self._run(head)
                events += block_events
                prefill_s, decode_s = prefill_s + p, decode_s + d
        metrics = generation_metrics(sum(map(len, generated)), prefill_s, decode_s)
        metrics.update({f"peak_bytes_{tier}": float(v) for tier, v in self.tracker.peaks().items()})
        return GenerationResult(
            token_ids=generated,
            texts=stop.texts(generated),
            metrics=metrics,
            timeline=Timeline(events, memory=[MemorySample(*sample) for sample in memory]),
            memory=self.tracker.breakdown(),
        )

    def score(self, sequences, *, teacher_forced: bool = False, greedy: bool = False) -> list:
        """Per sequence, float32 log-probabilities of tokens ``1..n-1`` given their prefix.

        By default one prefill per block computes them, which never reads the KV cache back. With
        ``teacher_forced=True`` each sequence is fed one token at a time through decode, so every
        token attends over the cache as stored (compressed, offloaded) — how a compressed cache's
        cost in accuracy is measured. With ``greedy=True`` each entry is a pair: the
        log-probabilities, and whether each token is the most likely one there (lm-eval's
        ``is_greedy``).
        """
        self._check_open()
        ids = encode_for_scoring(sequences, self.model.tokenizer, self.model.config)
        out: list = []
        for first in range(0, len(ids), self.policy.block_size):
            chunk = ids[first : first + self.policy.block_size]
            bs = self.policy.gpu_batch_size
            head = (
                TeacherHead(chunk, bs, self.model.config.padding_id, self.device)
                if teacher_forced
                else ScoreHead(chunk, bs)
            )
            self._run(head)
            out += list(zip(head.scores, head.greedy)) if greedy else head.scores
        return out

    def _run(self, head: Head):
        """Run one block. After an error or Ctrl-C the engine is as it was before the call (every
        read buffer free, nothing of the run held), so the next call works; if even that cannot
        be known (a second interrupt while cleaning up), the next call says to re-create it."""
        longest = max(len(seq) for batch in head.prefill_ids() for seq in batch)
        self._check_memory(longest, head.num_tokens, len(head.ids))
        try:
            return BlockRun(dataclasses.replace(self._context, lean=self._guard.lean), head).run()
        except BaseException:
            if self._executor is not None and self._executor.settled:
                self.weights.reset()
            else:
                self._broken = True
            raise
        finally:
            return_freed_memory()  # what the block held is freed: let the process's memory show it

    def _check_open(self) -> Executor:
        """The executor of an engine still usable; raises FlexlabError naming why if not."""
        if self._executor is None:
            raise FlexlabError("this Engine is closed; create a new one (or use it inside a `with` block)")
        if self._broken:
            raise FlexlabError(
                "this Engine was interrupted while it cleaned up after an earlier error, so its "
                "transfers may still be running; close it and create a new Engine"
            )
        return self._executor

    @property
    def executor(self) -> Executor:
        if self._executor is None:
            raise FlexlabError("this Engine is closed; create a new one")
        return self._executor

    def weight_reads(self) -> list[tuple[Path, int, int]]:
        """The disk reads one token's weights take: ``(file, offset, bytes)``, in stage order
        (empty when no weight is on disk). :func:`flexlab.cost.refresh` times them to probe the
        disk as this engine's reads will see it."""
        self._check_open()
        return self.weights.disk_reads()

    @property
    def offload_dir(self) -> Path | None:
        """The directory holding this engine's files (removed on close)."""
        return self._dir

    def __repr__(self) -> str:
        return f"Engine({self.model.config.name!r}, {self.policy.describe()}, device={self.device})"
