"""flexlab as an lm-evaluation-harness backend: ``lm_eval --model flexlab`` under any policy.

Importing this module registers the model ``flexlab`` with lm-eval (``pip install
flexlab[eval]``). Its arguments are a checkpoint and a policy in FlexGen's terms::

    flexlab eval --tasks hellaswag --model_args pretrained=DIR,dtype=float32,percent=20:30:0:100:100:0,\\
        gpu_batch_size=8,num_gpu_batches=4,compress_weight=4:64,compress_cache=4:64:per-channel

In Python (after ``import flexlab.eval.lm_eval``)::

    lm_eval.simple_evaluate(model="flexlab", model_args="pretrained=DIR", tasks=["lambada_openai"])
    lm_eval.simple_evaluate(model=FlexlabLM(model=model, policy=policy), tasks=[...])   # in a notebook

A policy the search saved is ``policy_file=p.json`` (``flexlab search ... --save-policy p.json``);
any argument given beside it replaces that field. Without either, everything is resident, as with
lm-eval's ``hf`` backend. Log-likelihoods come from one prefill per sequence unless the cache is
compressed or attention sparse: then each token is fed through decode and attends over the cache
as stored, which is what such a cache costs (``teacher_forced=true|false`` overrides). Tokenization follows
lm-eval's conventions (its ``TemplateLM``, as the ``hf`` backend does), so the two backends score
the same tokens: the tests compare them request by request. Requests go through the engine's
blocks, so offloading amortises over many requests as it does in generation.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from collections import defaultdict
from typing import Any

import lm_eval.models  # noqa: F401  (lm-eval's own backends: lm-eval loads them only into an empty registry)
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm.auto import tqdm

from flexlab.compress import CacheQuantConfig, QuantConfig
from flexlab.engine import Engine, Policy
from flexlab.engine.policy import PERCENT_FIELDS, PolicyError
from flexlab.errors import FlexlabError
from flexlab.models.model import Model

CHUNK = 64  # sequences scored per engine call (a progress bar moves per chunk)


@register_model("flexlab")
class FlexlabLM(TemplateLM):
    """An lm-eval model running on flexlab's engine; see the module docstring for its arguments."""

    def __init__(
        self,
        pretrained: str | None = None,
        *,
        model: Model | None = None,
        policy: Policy | None = None,
        dtype: str | None = None,
        device: str | None = None,
        policy_file: str | None = None,
        percent: str | None = None,
        gpu_batch_size: int | None = None,
        num_gpu_batches: int | None = None,
        compress_weight: str | None = None,
        compress_cache: str | None = None,
        cpu_cache_compute: bool = False,
        attn_sparsity: float | None = None,
        offload_dir: str | None = None,
        max_gen_toks: int = 256,
        teacher_forced: bool | None = None,
        batch_size: int | str | None = None,
        max_batch_size: int | None = None,
        **unknown,
    ) -> None:
        super().__init__()
        if unknown:
            raise FlexlabError(
                f"flexlab model_args: unknown {sorted(unknown)}; it takes pretrained, dtype, device, policy_file, "
                "percent, gpu_batch_size, num_gpu_batches, compress_weight, compress_cache, cpu_cache_compute, "
                "attn_sparsity, offload_dir, max_gen_toks, teacher_forced"
            )
        if (model is None) == (pretrained is None):
            raise FlexlabError("flexlab model_args: give pretrained=DIR (or, in Python, model=flexlab.Model)")
        if model is None:
            import torch

            if str(device or "").startswith("cuda") and not torch.cuda.is_available():
                # lm-eval's command line asks for cuda unless told otherwise
                warnings.warn(f"device={device!r} asked, but there is no CUDA device: running on the CPU", stacklevel=2)
                device = "cpu"

            torch_dtype = None if dtype in (None, "auto") else getattr(torch, str(dtype), None)
            if dtype not in (None, "auto") and not isinstance(torch_dtype, torch.dtype):
                raise FlexlabError(f"flexlab model_args: dtype={dtype!r} is not a torch dtype (float32, bfloat16, ...)")
            model = Model.from_pretrained(str(pretrained), dtype=torch_dtype, device=device)
        if model.tokenizer is None:
            raise FlexlabError(f"{model.config.name} has no tokenizer: lm-eval's tasks are text")
        if policy is None:
            # lm-eval's --batch_size (1 unless given) sizes the batches only where nothing else does
            size = gpu_batch_size or (batch_size if isinstance(batch_size, int) and not policy_file else None)
            given = dict(gpu_batch_size=size, num_gpu_batches=num_gpu_batches, attn_sparsity=attn_sparsity)
            policy = policy_from_model_args(
                policy_file, percent, given, compress_weight, compress_cache, cpu_cache_compute
            )
        self.model, self.policy, self.offload_dir = model, policy, offload_dir
        self.tokenizer = model.tokenizer
        self.max_gen_toks = max_gen_toks
        # A prefill attends over the keys and values it has just computed, never over the cache as
        # stored: what a compressed or sparse cache costs shows only when each token is fed through
        # decode. Without either, one prefill gives the same numbers, much faster.
        self.teacher_forced = (
            bool(teacher_forced)
            if teacher_forced is not None
            else policy.compress_cache is not None or policy.attn_sparsity < 1
        )
        # what the runs cost, for the results file (get_model_info): tokens scored or generated
        self.runs = {"calls": 0, "sequences": 0, "tokens": 0, "seconds": 0.0}
        self.peak_bytes = {"gpu": 0.0, "cpu": 0.0, "disk": 0.0}

    def get_model_info(self) -> dict:
        """lm-eval adds this to its results' ``config``: the policy, compression, and what the runs
        cost (tokens scored or generated per second, peak bytes per tier)."""
        seconds = self.runs["seconds"]
        return {
            "flexlab": {
                "version": __import__("flexlab").__version__,
                "model": self.model.config.name,
                "dtype": str(self.model.dtype).removeprefix("torch."),
                "policy": self.policy.to_dict(),
                "policy_described": self.policy.describe(),
                "loglikelihood_by": "teacher-forced decode" if self.teacher_forced else "prefill",
                **self.runs,
                "tokens_per_s": self.runs["tokens"] / seconds if seconds else None,
                "peak_bytes": dict(self.peak_bytes),
            }
        }

    # ---- what TemplateLM needs -----------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.eot_token_id

    @property
    def max_length(self) -> int:
        return self.model.config.max_positions

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        """As lm-eval's ``hf`` backend: the tokenizer's own special tokens unless told, and none
        added to a string that already starts with the BOS text."""
        if add_special_tokens is None:
            bos = self.tokenizer.decode([self.prefix_token_id])
            add_special_tokens = not (bos and string.startswith(bos))
        return self.tokenizer.encode(string, add_special_tokens=add_special_tokens)

    @contextlib.contextmanager
    def _engine(self):
        """An engine for one batch of requests; its time and peak bytes are added to the tally."""
        start = time.perf_counter()
        with Engine(self.model, self.policy, offload_dir=self.offload_dir) as engine:
            yield engine
            peaks = engine.tracker.peaks()
        self.runs["calls"] += 1
        self.runs["seconds"] += time.perf_counter() - start
        self.peak_bytes = {t: max(v, float(peaks[t])) for t, v in self.peak_bytes.items()}

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """Each ``(_, context ids, continuation ids)``: the continuation's log-likelihood and
        whether greedy decoding would produce it: one prefill per sequence, or token by token
        through decode where the cache as stored is what is measured (``teacher_forced``)."""
        sequences, lengths = [], []
        for _, context, continuation in requests:
            # the context gives way from the left; the last token is only predicted, so one more fits
            whole = (context + continuation)[-(self.max_length + 1) :]
            sequences.append(whole)
            lengths.append(len(continuation))
        order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))  # alike lengths pad little
        out: list[tuple[float, bool]] = [(0.0, False)] * len(sequences)
        with self._engine() as engine:
            for first in tqdm(range(0, len(order), CHUNK), desc="flexlab loglikelihood", disable=disable_tqdm):
                chunk = order[first : first + CHUNK]
                for i, (logprobs, greedy) in zip(
                    chunk, engine.score([sequences[i] for i in chunk], greedy=True, teacher_forced=self.teacher_forced)
                ):
                    n = lengths[i]
                    out[i] = (float(logprobs[-n:].sum()), bool(greedy[-n:].all()))
        self.runs["sequences"] += len(sequences)
        self.runs["tokens"] += sum(map(len, sequences))
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Each text's log-likelihood over windows of the model's length, each token predicted once."""
        windows, owner = [], []
        for i, req in enumerate(requests):
            (text,) = req.args
            rolled = get_rolling_token_windows(
                token_list=self.tok_encode(text),
                prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length,
                context_len=1,
            )
            for context, continuation in map(make_disjoint_window, rolled):
                windows.append((None, context, continuation))
                owner.append(i)
        totals = [0.0] * len(requests)
        for i, (logprob, _) in zip(owner, self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)):
            totals[i] += logprob
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy (or sampled, as the task asks) continuations cut at the first stop string."""
        groups: dict[str, list[int]] = defaultdict(list)
        for i, req in enumerate(requests):
            groups[repr(sorted(req.args[1].items()))].append(i)
        out = [""] * len(requests)
        made = 0
        with self._engine() as engine:
            for members in tqdm(groups.values(), desc="flexlab generate_until", disable=disable_tqdm):
                kwargs = dict(requests[members[0]].args[1])
                until = kwargs.pop("until", None) or [self.tokenizer.decode([self.eot_token_id])]
                until = [until] if isinstance(until, str) else list(until)
                new = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
                room = max(1, self.max_length - new)
                prompts = [self.tok_encode(requests[i].args[0])[-room:] or [self.prefix_token_id] for i in members]
                sampling: dict[str, Any] = dict(do_sample=bool(kwargs.get("do_sample", False)))
                if sampling["do_sample"]:
                    sampling.update(temperature=float(kwargs.get("temperature", 1.0)), seed=kwargs.get("seed"))
                result = engine.generate(prompts, max_new_tokens=new, stop_strings=until, **sampling)
                made += sum(map(len, result.token_ids))
                for i, ids in zip(members, result.token_ids):
                    text = self.tokenizer.decode(ids, skip_special_tokens=True)
                    for stop in until:
                        text = text.split(stop)[0]
                    out[i] = text
        self.runs["sequences"] += len(requests)
        self.runs["tokens"] += made
        return out


def policy_from_model_args(
    policy_file: str | None,
    percent: str | None,
    given: dict[str, Any],
    compress_weight: str | None,
    compress_cache: str | None,
    cpu_cache_compute: bool,
) -> Policy:
    """The Policy of the model_args: a saved policy (``flexlab search --save-policy``), else
    everything resident in batches of 8; then each argument given (``given``: fields, None where
    not given) replaces its field."""
    fields: dict[str, Any] = {"gpu_batch_size": 8}
    if policy_file:
        try:
            fields = Policy.load(policy_file).to_dict()
        except PolicyError as e:
            raise FlexlabError(f"flexlab model_args: policy_file={policy_file}: {e}") from None
    if percent:
        try:
            shares = [float(x) for x in str(percent).replace(":", " ").split()]
        except ValueError:
            shares = []
        if len(shares) != 6:
            raise FlexlabError(f"flexlab model_args: percent={percent!r} is not six numbers such as 20:30:0:100:100:0")
        fields.update(zip(PERCENT_FIELDS, shares))
    fields.update({name: value for name, value in given.items() if value is not None})
    for name, kind, spec in (
        ("compress_weight", QuantConfig, compress_weight),
        ("compress_cache", CacheQuantConfig, compress_cache),
    ):
        if spec:
            try:
                fields[name] = kind.parse(str(spec))
            except ValueError as e:
                raise FlexlabError(f"flexlab model_args: {name}={spec!r}: {e}") from None
    if cpu_cache_compute:
        fields["cpu_cache_compute"] = True
    return Policy.from_dict(fields)
