"""lm-evaluation-harness tasks built offline from the pydoc text, for machines with no network.

lm-eval's own tasks download their data from the Hugging Face hub. These two are made here from
the held-out pydoc documents (the ones the pydoc models never trained on), so a compression
ablation or a backend check runs anywhere:

- ``pydoc_order`` (multiple choice, ``acc`` and ``acc_norm``): four words of a sentence in their
  own order, after the sentence so far, against three reorderings of them. A model that has learned English word order
  picks the original; compression that damages the model shows as lost accuracy.
- ``pydoc_last_word`` (``generate_until``, ``exact_match``): greedy generation of a sentence's
  last word, LAMBADA-style; the first word generated is compared with it.

Both carry the tag ``flexlab_pydoc`` (``--tasks flexlab_pydoc`` runs the pair). ``flexlab eval``
and ``experiments/ablate_compression.py`` find them without being told; elsewhere give lm-eval
the directory::

    from lm_eval.tasks import TaskManager
    lm_eval.simple_evaluate(model="flexlab", model_args=..., tasks=["pydoc_order"],
                            task_manager=TaskManager(include_path=str(pydoc_tasks_dir())))
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
from pathlib import Path

from flexlab.files import disown, owned_dir, remove, sweep_stale
from flexlab.models.pydoc_model import cache_dir, pydoc_texts

TASKS = ("pydoc_order", "pydoc_last_word")
TAG = "flexlab_pydoc"
WINDOW_WORDS = 4  # the words reordered in each pydoc_order item
DISTRACTORS = 3


def pydoc_sentences() -> list[str]:
    """Prose sentences of the held-out pydoc documents (10-40 words, ending in a full stop).

    Indented paragraphs (code, grammar rules) and sentences that are mostly symbols are left out."""
    sentences = []
    for text in pydoc_texts()[1]:
        for para in re.split(r"\n\s*\n", text):
            if para.startswith(" "):
                continue
            for s in re.split(r"(?<=[.])\s+(?=[A-Z])", " ".join(para.split())):
                letters = sum(c.isalpha() or c == " " for c in s)
                if 10 <= len(s.split()) <= 40 and s.endswith(".") and letters > 0.9 * len(s):
                    sentences.append(s)
    return sentences


def order_items(sentences: list[str], seed: int = 0) -> list[dict]:
    """``pydoc_order``'s documents: context, four choices (the original words among reorderings
    of them), answer. A sentence gives an item per run of four words, from its end back to
    where at least four words of context remain."""
    rng = random.Random(seed)
    items = []
    for s in sentences:
        words = s.split()
        for end in range(len(words), 2 * WINDOW_WORDS - 1, -WINDOW_WORDS):
            window = words[end - WINDOW_WORDS : end]
            others: list[list[str]] = []
            for _ in range(100):  # distinct reorderings; a window of repeated words may have too few
                w = rng.sample(window, len(window))
                if w != window and w not in others:
                    others.append(w)
                if len(others) == DISTRACTORS:
                    break
            if len(others) < DISTRACTORS:
                continue
            answer = rng.randrange(DISTRACTORS + 1)  # the original's position, so position says nothing
            choices = others[:answer] + [window] + others[answer:]
            context = " ".join(words[: end - WINDOW_WORDS])
            items.append({"context": context, "choices": [" ".join(c) for c in choices], "answer": answer})
    return items


def last_word_docs(sentences: list[str]) -> list[dict]:
    """``pydoc_last_word``'s documents: a sentence without its last word, and that word."""
    docs = []
    for s in sentences:
        *head, last = s[:-1].split()
        if last.isalpha() and len(last) >= 3:
            docs.append({"context": " ".join(head), "word": last})
    return docs


def _yaml(task: str, data: Path, body: str) -> str:
    # JSON is YAML: the data path is quoted whatever characters it holds.
    return (
        f"task: {task}\ntag: {TAG}\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {json.dumps(str(data))}\n"
        "test_split: test\ndoc_to_text: '{{context}}'\n" + body
    )


ORDER_YAML = """output_type: multiple_choice
doc_to_choice: '{{choices}}'
doc_to_target: '{{answer}}'
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""
LAST_WORD_YAML = """output_type: generate_until
doc_to_target: '{{word}}'
generation_kwargs:
  until: ["\\n", "."]
  max_gen_toks: 6
  do_sample: false
filter_list:
  - name: first_word
    filter:
      - function: regex
        regex_pattern: '([A-Za-z_]+)'
      - function: take_first
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""


def pydoc_tasks_dir(parent: str | os.PathLike | None = None) -> Path:
    """The directory of the two tasks' YAML and data (lm-eval's ``include_path``), written once.

    It lives under the flexlab cache (``$FLEXLAB_CACHE``) unless ``parent`` is given, named by a
    digest of its contents, and is written into a temporary sibling and renamed, so a reader never
    sees half of it."""
    sentences = pydoc_sentences()
    data = {"pydoc_order": order_items(sentences), "pydoc_last_word": last_word_docs(sentences)}
    yamls = {"pydoc_order": ORDER_YAML, "pydoc_last_word": LAST_WORD_YAML}
    digest = hashlib.sha256(json.dumps([data, yamls]).encode()).hexdigest()[:10]
    base = Path(parent) if parent is not None else cache_dir()
    path = base / f"lm-eval-tasks-{digest}"
    if all((path / f"{t}.yaml").exists() for t in TASKS):
        return path
    base.mkdir(parents=True, exist_ok=True)
    sweep_stale(base, ".lm-eval-tasks-")
    tmp = owned_dir(base, ".lm-eval-tasks-")
    try:
        for task in TASKS:  # the YAML names the data by its final path, where it will be after the rename
            (tmp / f"{task}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in data[task]))
            (tmp / f"{task}.yaml").write_text(_yaml(task, path / f"{task}.jsonl", yamls[task]))
        disown(tmp)
        try:
            os.replace(tmp, path)
        except OSError:  # another process wrote the same contents first
            pass
    finally:
        remove(tmp)
    return path
