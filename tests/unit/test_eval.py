"""Accuracy helpers and the ablation grid, on fakes (no model)."""

from __future__ import annotations

import re
import sys
from types import SimpleNamespace

import matplotlib
import pandas as pd
import pytest

from flexlab.errors import FlexlabError
from flexlab.eval import (
    ablation_settings,
    eval_texts,
    last_word_accuracy,
    last_word_items,
    token_agreement,
    token_windows,
)
from flexlab.eval.local_tasks import pydoc_tasks_dir as pydoc_tasks
from flexlab.viz import plot_accuracy_vs_bits

matplotlib.use("Agg")


class WordTokenizer:
    """One id per word (ids from a growing vocabulary); BOS is 0."""

    bos_token_id = 0

    def __init__(self):
        self.vocab: dict[str, int] = {}

    def __call__(self, text, add_special_tokens=True):
        ids = [self.vocab.setdefault(w, len(self.vocab) + 1) for w in text.split()]
        return {"input_ids": ([self.bos_token_id] if add_special_tokens else []) + ids}


def test_token_agreement_counts_positions_up_to_the_shorter_side():
    assert token_agreement([[1, 2, 3, 4]], [[1, 2, 9]]) == 2 / 3
    with pytest.raises(ValueError, match="2 reference generations and 1 others"):
        token_agreement([[1], [2]], [[1]])


PASSAGE = "the quick brown fox jumps over the lazy dog and then the fox sleeps under the old tree"


def test_last_word_items_split_context_and_final_word():
    tok = WordTokenizer()
    items = last_word_items([PASSAGE + ".\n\nshort one here.", "no final word 42"], tok, min_words=5)
    assert len(items) == 1  # the short paragraph and the one ending in a number are skipped
    (item,) = items
    assert item.word == "tree" and item.target == [tok.vocab["tree"]]
    assert item.context == tok(PASSAGE.rsplit(" ", 1)[0])["input_ids"]


def test_last_word_accuracy_compares_the_generated_prefix():
    tok = WordTokenizer()
    items = last_word_items([PASSAGE, PASSAGE.replace("tree", "bridge")], tok, min_words=5)

    def generate(prompts, max_new_tokens, stop_token_ids):  # always says "tree", then more
        return SimpleNamespace(token_ids=[[tok.vocab["tree"], 99][: max_new_tokens + 1] for _ in prompts])

    assert last_word_accuracy(generate, items) == 0.5


def test_token_windows_start_with_bos_and_have_the_length_asked():
    windows = token_windows(["a b c d e f g", "h i j k"], WordTokenizer(), seq_len=4)
    assert [len(w) for w in windows] == [4, 4, 4] and all(w[0] == 0 for w in windows)
    assert windows[1][1:] == [4, 5, 6]  # one stream across documents, no overlap


def test_eval_texts_offline_and_bad_names():
    name, texts = eval_texts("pydoc")
    assert name == "pydoc held-out topics" and sum(map(len, texts)) > 20_000
    with pytest.raises(FlexlabError, match="unknown evaluation dataset 'wiki'"):
        eval_texts("wiki")


def test_wikitext_without_datasets_says_how_to_get_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # as without the package (lm-eval brings it in dev)
    with pytest.raises(FlexlabError, match="install `datasets`"):
        eval_texts("wikitext-2")
    with pytest.warns(UserWarning, match="pydoc held-out topics instead"):
        assert eval_texts("auto")[0] == "pydoc held-out topics"


def test_ablation_grid():
    settings = ablation_settings()
    # baseline + 4 bits x 3 groups x (weights + 2 cache layouts + 2 "both" layouts)
    assert len(settings) == 1 + 4 * 3 * 5
    both = [s for s in settings if s.target == "both" and s.kv_layout == "per-channel"][0]
    from flexlab import Policy, QuantConfig

    p = both.policy(Policy())
    assert type(p.compress_weight) is QuantConfig and p.compress_cache.kv_layout == "per-channel"
    with pytest.raises(ValueError, match="unknown target 'kv'"):
        ablation_settings(targets=("kv",))


def test_accuracy_plot_has_a_column_per_target_and_a_line_per_group():
    rows = [
        dict(
            target="none",
            bits=None,
            group_size=None,
            kv_layout=None,
            perplexity_change_pct=0.0,
            weight_bits_per_element=32.0,
            cache_bits_per_element=32.0,
        )
    ]
    for target in ("weights", "cache"):
        for g in (32, 64):
            for b in (2, 4, 8):
                rows.append(
                    dict(
                        target=target,
                        bits=b,
                        group_size=g,
                        kv_layout="per-token" if target == "cache" else None,
                        perplexity_change_pct=100 / b,
                        weight_bits_per_element=b + 32 / g,
                        cache_bits_per_element=b + 32 / g,
                    )
                )
    df = pd.DataFrame(rows)
    for t in ("gpu", "cpu", "disk"):
        df[f"peak_bytes_{t}"] = 1000 - 10 * df.bits.fillna(0)
    fig = plot_accuracy_vs_bits(df)
    top = [ax for ax in fig.axes if ax.get_title().startswith("compressed:")]
    assert [ax.get_title() for ax in top] == ["compressed: weights", "compressed: cache"]
    assert [line.get_label() for line in top[0].get_lines()] == ["g32", "g64", "uncompressed"]
    assert list(top[0].get_lines()[0].get_ydata()) == [50.0, 25.0, 12.5]
    with pytest.raises(ValueError, match="metric 'bleu' is not a column"):
        plot_accuracy_vs_bits(df, "bleu")
    # an lm-eval accuracy: one y scale for every column (a cache's item or two is not an effect)
    df["lm_eval:pydoc_order:acc,none"] = [0.8] + [
        0.8 - (0.1 / b if t == "weights" else 0.01) for t, b in zip(df.target[1:], df.bits[1:])
    ]
    fig = plot_accuracy_vs_bits(df, "lm_eval:pydoc_order:acc,none")
    top = [ax for ax in fig.axes if ax.get_title().startswith("compressed:")]
    assert top[0].get_ylim() == top[1].get_ylim() and top[0].get_ylim()[0] < 0.75
    assert top[0].get_ylabel() == "pydoc_order acc (lm-eval)"


def test_the_ablation_says_how_long_the_grid_will_take_and_can_be_cut(capsys):
    import torch

    import flexlab
    from flexlab.eval import run_ablation

    model = flexlab.Model.from_config("opt-tiny", seed=0, dtype=torch.float32)
    settings = ablation_settings(bits=(4, 2), group_sizes=(16,), targets=("weights",))  # baseline + 2
    seqs = [[2, 5, 6, 7, 8, 9]] * 2
    df = run_ablation(
        model,
        settings,
        base_policy=flexlab.Policy(gpu_batch_size=2),
        sequences=seqs,
        prompts=seqs,
        gen_len=2,
        max_settings=2,
    )
    out = capsys.readouterr()
    assert list(df.setting)[:1] == ["none"] and len(df) == 2
    text = out.out + out.err
    assert "measuring the first 2 of 3 settings" in text
    assert re.search(r"the baseline took [\d.]+ s: the other 1 settings, about [\d.]+ min", text)


def test_the_offline_pydoc_tasks_are_well_formed_and_written_once(tmp_path):
    import json

    from flexlab.eval.local_tasks import TASKS, last_word_docs, order_items, pydoc_sentences

    sentences = pydoc_sentences()
    items = order_items(sentences)
    assert len(items) >= 200  # several items per sentence: a window of four words at a time
    for item in items:
        choices = item["choices"]
        right = choices[item["answer"]]
        assert len(set(choices)) == 4 and all(sorted(c.split()) == sorted(right.split()) for c in choices)
        assert len(item["context"].split()) >= 4 and any(s.startswith(f"{item['context']} {right}") for s in sentences)
    ends = [i for i in items if any(s == f"{i['context']} {i['choices'][i['answer']]}" for s in sentences)]
    assert len(ends) >= 40  # most sentences give their last four words as one item
    assert len({i["answer"] for i in items}) == 4  # the original is not always in one place
    docs = last_word_docs(sentences)
    assert len(docs) >= 16 and all(f"{d['context']} {d['word']}." in sentences and d["word"].isalpha() for d in docs)

    path = pydoc_tasks(tmp_path)
    assert sorted(p.name for p in path.iterdir()) == sorted([f"{t}.{e}" for t in TASKS for e in ("jsonl", "yaml")])
    assert [json.loads(line) for line in (path / "pydoc_order.jsonl").read_text().splitlines()] == items
    assert str(path / "pydoc_order.jsonl") in (path / "pydoc_order.yaml").read_text()  # the final path, not the temp
    before = (path / "pydoc_order.yaml").stat().st_mtime_ns
    assert pydoc_tasks(tmp_path) == path and (path / "pydoc_order.yaml").stat().st_mtime_ns == before
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary directory left beside it


def test_flexlab_eval_finds_the_pydoc_tasks_unless_given_a_task_directory(monkeypatch, tmp_path):
    import argparse

    pytest.importorskip("lm_eval")
    import lm_eval.__main__

    from flexlab import cli

    seen = []
    monkeypatch.setenv("FLEXLAB_CACHE", str(tmp_path))
    monkeypatch.setattr(lm_eval.__main__, "cli_evaluate", lambda: seen.append(list(sys.argv)))
    cli.evaluate(argparse.Namespace(rest=["--tasks", "pydoc_order"]))
    cli.evaluate(argparse.Namespace(rest=["--tasks", "mine", "--include_path", "/my/tasks"]))
    assert seen[0][-2:] == ["--include_path", str(pydoc_tasks(tmp_path))] and seen[0][:4] == [
        "lm_eval",
        "run",
        "--model",
        "flexlab",
    ]
    assert seen[1].count("--include_path") == 1 and seen[1][-1] == "/my/tasks"
