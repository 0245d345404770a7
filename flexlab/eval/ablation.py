"""What compression costs: one model, many compression settings, one tidy table.

Each setting runs through the engine under the same base policy: perplexity by teacher-forced
decode (so a compressed cache is written and read back), token agreement of a greedy generation
with the uncompressed run, last-word accuracy, bits per element, peak bytes per tier and
throughput. The first row is the uncompressed baseline the others are compared with.

    >>> settings = ablation_settings(bits=(4,), group_sizes=(64,), targets=("cache",))
    >>> [s.name for s in settings]
    ['none', 'cache 4-bit g64', 'cache 4-bit g64 per-channel keys']
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from flexlab.compress import CacheQuantConfig, QuantConfig
from flexlab.engine import Engine, Policy
from flexlab.eval.accuracy import LastWordItem, last_word_accuracy, token_agreement
from flexlab.eval.perplexity import perplexity

TARGETS = ("weights", "cache", "both")


@dataclass(frozen=True)
class AblationSetting:
    """One row of the ablation: what is compressed, and how."""

    target: str  # "none", "weights", "cache" or "both"
    bits: int | None = None
    group_size: int | None = None
    kv_layout: str = "per-token"

    @property
    def name(self) -> str:
        if self.target == "none":
            return "none"
        layout = " per-channel keys" if self.kv_layout == "per-channel" else ""
        return f"{self.target} {self.bits}-bit g{self.group_size}{layout}"

    @classmethod
    def from_row(cls, row) -> AblationSetting:
        """The setting of one row of :func:`run_ablation`'s table (a pandas row or a dict)."""
        if row["target"] == "none":
            return cls("none")
        layout = row.get("kv_layout")
        return cls(
            row["target"], int(row["bits"]), int(row["group_size"]), layout if isinstance(layout, str) else "per-token"
        )  # NaN for weights-only rows

    def policy(self, base: Policy) -> Policy:
        if self.target == "none":
            return base
        assert self.bits is not None and self.group_size is not None, f"{self.target} without bits and group size"
        q = QuantConfig(bits=self.bits, group_size=self.group_size)
        return base.replace(
            compress_weight=q if self.target in ("weights", "both") else None,
            compress_cache=CacheQuantConfig.of(q, kv_layout=self.kv_layout) if self.target != "weights" else None,
        )


def ablation_settings(
    bits=(8, 4, 3, 2), group_sizes=(32, 64, 128), targets=TARGETS, kv_layouts=("per-token", "per-channel")
) -> list[AblationSetting]:
    """The uncompressed baseline, then bits × group size × target (× KV layout where a cache is
    compressed)."""
    for t in targets:
        if t not in TARGETS:
            raise ValueError(f"unknown target {t!r}; choose from {TARGETS}")
    out = [AblationSetting("none")]
    for target in targets:
        for b in bits:
            for g in group_sizes:
                for layout in kv_layouts if target != "weights" else ("per-token",):
                    out.append(AblationSetting(target, b, g, layout))
    return out


def run_ablation(
    model,
    settings: list[AblationSetting],
    *,
    base_policy: Policy,
    sequences: list[list[int]],
    prompts: list[list[int]],
    gen_len: int = 16,
    last_word: Sequence[LastWordItem] = (),
    offload_dir=None,
    progress: bool = True,
    lm_eval_tasks: list | None = None,
    lm_eval_options: dict | None = None,
    max_settings: int | None = None,
):
    """Measure every setting; returns a pandas DataFrame, one row per setting (baseline first).

    ``lm_eval_tasks``: lm-evaluation-harness tasks (names, or task config dicts) run under each
    setting too (``pip install flexlab[eval]``); each task's metrics become columns
    ``lm_eval:TASK:METRIC``. ``lm_eval_options``: more keywords of ``lm_eval.simple_evaluate``
    (``limit``, ``task_manager``, ``num_fewshot``, ...). ``max_settings``: measure only the first
    that many (the baseline included), to cut a large grid short. After the baseline the time the
    rest will take is estimated from it (compressed settings are slower: dequantization).
    """
    import time

    import pandas as pd
    from tqdm.auto import tqdm

    if not settings or settings[0].target != "none":
        settings = [AblationSetting("none"), *settings]
    if max_settings is not None and len(settings) > max_settings:
        tqdm.write(f"measuring the first {max_settings} of {len(settings)} settings (max_settings)")
        settings = settings[: max(1, max_settings)]
    rows, reference = [], None
    start = time.perf_counter()
    for i, setting in enumerate(tqdm(settings, desc="compression settings", disable=not progress)):
        if i == 1 and progress:
            each = time.perf_counter() - start
            tqdm.write(
                f"the baseline took {each:.1f} s: the other {len(settings) - 1} settings, about "
                f"{each * (len(settings) - 1) / 60:.1f} min or more (pass max_settings= to cut the grid)"
            )
        policy = setting.policy(base_policy)
        with Engine(model, policy, offload_dir=offload_dir) as engine:
            ppl = perplexity(lambda s: engine.score(s, teacher_forced=True), sequences, batch_size=policy.block_size)
            gen = engine.generate(prompts, max_new_tokens=gen_len, stop_token_ids=None)
            lw = last_word_accuracy(engine.generate, last_word, policy.block_size) if last_word else float("nan")
            stored = engine.weights.tier_bytes()
        reference = reference or gen.token_ids
        scores = _lm_eval_scores(model, policy, offload_dir, lm_eval_tasks, lm_eval_options) if lm_eval_tasks else {}
        row = {
            "setting": setting.name,
            "target": setting.target,
            "bits": setting.bits,
            "group_size": setting.group_size,
            "kv_layout": setting.kv_layout if setting.target in ("cache", "both") else None,
            "perplexity": ppl,
            "token_agreement": token_agreement(reference, gen.token_ids),
            "last_word_accuracy": lw,
            "weight_bits_per_element": _bits(policy.compress_weight, model.dtype),
            "cache_bits_per_element": _bits(policy.compress_cache, model.dtype),
            "throughput_tok_s": gen.metrics["throughput_tok_s"],
        }
        for tier in ("gpu", "cpu", "disk"):
            row[f"weights_bytes_{tier}"] = stored[tier]
            row[f"peak_bytes_{tier}"] = gen.metrics[f"peak_bytes_{tier}"]
        rows.append({**row, **scores})
    df = pd.DataFrame(rows)
    base = df.iloc[0]
    df["perplexity_change_pct"] = 100 * (df["perplexity"] / base["perplexity"] - 1)
    for tier in ("gpu", "cpu", "disk"):
        before = base[f"peak_bytes_{tier}"]
        df[f"saved_{tier}_pct"] = 100 * (1 - df[f"peak_bytes_{tier}"] / before) if before else 0.0
    return df


def _lm_eval_scores(model, policy: Policy, offload_dir, tasks: list, options: dict | None) -> dict[str, float]:
    """lm-eval's metrics of ``tasks`` under ``policy``, as ``{"lm_eval:TASK:METRIC": value}``."""
    import lm_eval

    from flexlab.eval.lm_eval import FlexlabLM

    lm = FlexlabLM(model=model, policy=policy, offload_dir=None if offload_dir is None else str(offload_dir))
    out = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), **(options or {}))
    return {
        f"lm_eval:{task}:{metric}": float(value)
        for task, metrics in out["results"].items()
        for metric, value in metrics.items()
        if isinstance(value, (int, float))
        and not isinstance(value, bool)
        and "," in metric  # "acc,none"
        and "stderr" not in metric
    }


def setting_generator(
    model, prompt: str | list[int], *, base_policy: Policy | None = None, max_new_tokens: int = 24, offload_dir=None
) -> Callable[[object], str]:
    """A function that generates ``prompt`` greedily under one setting (on ``base_policy``) and
    returns the text; what :class:`flexlab.viz.CompressionExplorer` calls to compare settings.
    It takes an :class:`AblationSetting` or a row of the ablation table."""
    base = base_policy or Policy()

    def generate(setting) -> str:
        if not isinstance(setting, AblationSetting):
            setting = AblationSetting.from_row(setting)
        with Engine(model, setting.policy(base), offload_dir=offload_dir) as engine:
            result = engine.generate([prompt], max_new_tokens=max_new_tokens)
        return result.texts[0] if result.texts else str(result.token_ids[0])

    return generate


def _bits(config: QuantConfig | None, dtype) -> float:
    return config.bits_per_element() if config is not None else 8.0 * dtype.itemsize
