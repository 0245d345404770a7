"""flexlab as an lm-evaluation-harness backend: the same scores as lm-eval's own ``hf`` backend on
the same checkpoint, request by request, under offloading; tasks run end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # a local task needs no hub
os.environ.setdefault("HF_HUB_OFFLINE", "1")
lm_eval = pytest.importorskip("lm_eval")

import flexlab  # noqa: E402
from flexlab.eval.lm_eval import FlexlabLM  # noqa: E402
from flexlab.models.pydoc_model import pydoc_model_path  # noqa: E402

pytestmark = pytest.mark.slow  # the pydoc model (trained once)

CONTEXTS = [
    ("The for statement", " is used to iterate"),
    ("A class definition", " creates a class object"),
    ("", "Exceptions are raised"),  # empty context: the prefix token stands in
    ("The while loop ", "repeats"),  # a trailing space moves to the continuation
    ("x", " y"),
]
DOCS = [
    ("The for statement is used to", [" iterate over the elements of a sequence", " paint a picture"]),
    ("A class definition", [" defines a class", " bakes bread"]),
    ("Exceptions are raised when", [" an error occurs", " the sun sets"]),
    ("The import statement", [" finds and loads a module", " waters the plants"]),
]


@pytest.fixture(scope="module")
def hf():
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=str(pydoc_model_path()), dtype="float32", device="cpu", batch_size=2)


def requests(kind: str, args: list) -> list:
    from lm_eval.api.instance import Instance

    return [Instance(kind, {}, a, i) for i, a in enumerate(args)]


@pytest.mark.parametrize(
    "model_args",
    [
        dict(),  # everything resident
        dict(percent="30:30:0:100:100:0", gpu_batch_size=2, num_gpu_batches=2),  # weights on all tiers
        dict(percent="0:0:0:0:0:100", gpu_batch_size=1, num_gpu_batches=3),  # weights and cache on disk
    ],
)
def test_the_same_scores_and_texts_as_lm_evals_hf_backend(hf, model_args, tmp_path):
    ours = FlexlabLM(pretrained=str(pydoc_model_path()), dtype="float32", offload_dir=str(tmp_path), **model_args)
    got, want = (
        ours.loglikelihood(requests("loglikelihood", CONTEXTS)),
        hf.loglikelihood(requests("loglikelihood", CONTEXTS)),
    )
    assert [g for _, g in got] == [g for _, g in want]
    assert [lp for lp, _ in got] == pytest.approx([lp for lp, _ in want], abs=1e-4)
    text = ["The for statement is used to iterate over the elements of a sequence. " * 40]  # > 512 tokens: windows
    assert ours.loglikelihood_rolling(requests("loglikelihood_rolling", [(t,) for t in text])) == pytest.approx(
        hf.loglikelihood_rolling(requests("loglikelihood_rolling", [(t,) for t in text])), rel=1e-5
    )
    gen = [("The for statement", {"until": ["\n\n", "."], "max_gen_toks": 12}), ("A class", {"until": "."})]
    assert ours.generate_until(requests("generate_until", gen)) == hf.generate_until(requests("generate_until", gen))


ON_DISK = ",percent=0:0:0:0:0:100,gpu_batch_size=4,num_gpu_batches=2"  # weights and cache on disk


@pytest.mark.parametrize("family, policy_args", [("opt", ""), ("opt", ON_DISK), ("llama", ON_DISK)])
def test_the_offline_pydoc_tasks_give_lm_evals_hf_backend_results_item_by_item(family, policy_args, tmp_path):
    """The acid test of the adapter: a multiple-choice and a generation task through
    ``simple_evaluate`` with both backends on the same float32 checkpoint (the pydoc OPT and its
    LLaMA-family twin)."""
    from lm_eval.tasks import TaskManager

    from flexlab.eval.local_tasks import TAG, TASKS, pydoc_tasks_dir

    tasks = TaskManager(include_path=str(pydoc_tasks_dir()))
    runs = {}
    for backend, args in (("hf", "device=cpu"), ("flexlab", f"offload_dir={tmp_path}{policy_args}")):
        model_args = f"pretrained={pydoc_model_path(family=family)},dtype=float32,{args}"
        runs[backend] = lm_eval.simple_evaluate(
            model=backend, model_args=model_args, tasks=[TAG], task_manager=tasks, log_samples=True, limit=64
        )
    ours, theirs = runs["flexlab"], runs["hf"]
    for task in TASKS:
        metrics = {k: v for k, v in theirs["results"][task].items() if "," in k and "stderr" not in k}
        assert metrics and {k: ours["results"][task][k] for k in metrics} == metrics
        mine, want = ours["samples"][task], theirs["samples"][task]
        assert len(mine) == len(want) == min(64, len(tasks.load_task_or_group(task)[task].eval_docs))
        for a, b in zip(mine, want):
            assert a["doc_id"] == b["doc_id"]
            if task == "pydoc_order":  # per choice: (log-likelihood, is greedy)
                got, expected = [r[0] for r in a["resps"]], [r[0] for r in b["resps"]]
                assert [g for _, g in got] == [g for _, g in expected]
                assert [lp for lp, _ in got] == pytest.approx([lp for lp, _ in expected], abs=1e-4)
            else:
                assert a["resps"] == b["resps"] and a["filtered_resps"] == b["filtered_resps"]
    assert ours["results"]["pydoc_order"]["acc,none"] >= 0.6  # word order is what the pydoc model learnt


def test_a_task_runs_through_simple_evaluate_and_compression_is_measured(tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"question": q, "choices": c, "answer": 0}) + "\n" for q, c in DOCS))
    task = {
        "task": "flexlab_pydoc_choices",
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data)}},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "{{question}}",
        "doc_to_choice": "{{choices}}",
        "doc_to_target": "{{answer}}",
        "metric_list": [{"metric": "acc"}],
    }
    base = f"pretrained={pydoc_model_path()},dtype=float32,gpu_batch_size=2,num_gpu_batches=2"
    accs = {}
    for name, extra in (("exact", ""), ("2-bit", ",compress_weight=2:64,compress_cache=2:32")):
        out = lm_eval.simple_evaluate(model="flexlab", model_args=base + extra, tasks=[task])
        accs[name] = out["results"]["flexlab_pydoc_choices"]["acc,none"]
        run = out["config"]["flexlab"]  # what ran and what it cost, beside lm-eval's own config
        assert run["policy"]["gpu_batch_size"] == 2 and (("2-bit" in run["policy_described"]) == (name == "2-bit"))
        assert run["sequences"] == 2 * len(DOCS) and run["tokens_per_s"] > 0 and run["peak_bytes"]["gpu"] > 0
    assert accs["exact"] >= 0.75  # the pydoc model knows its docs
    assert 0 <= accs["2-bit"] <= 1


@pytest.fixture
def task_dir(tmp_path):
    """A directory of one task YAML (lm-eval's --include_path): multiple choice over DOCS."""
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"question": q, "choices": c, "answer": 0}) + "\n" for q, c in DOCS))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "choices.yaml").write_text(
        "task: flexlab_cli_choices\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\noutput_type: multiple_choice\n"
        "doc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\ndoc_to_target: '{{answer}}'\n"
        "metric_list:\n  - metric: acc\n"
    )
    return tmp_path / "tasks"


def test_flexlab_eval_forwards_to_lm_evals_command_line(task_dir, tmp_path):
    args = ["--tasks", "flexlab_cli_choices", "--include_path", str(task_dir), "--output_path", str(tmp_path)]
    args += ["--model_args", f"pretrained={pydoc_model_path()},dtype=float32,percent=50:50:0:100:100:0"]
    done = subprocess.run([sys.executable, "-m", "flexlab", "eval", *args], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    written = list(tmp_path.rglob("results_*.json"))
    saved = json.loads(written[0].read_text())
    assert "flexlab_cli_choices" in saved["results"]
    assert saved["config"]["flexlab"]["policy"]["w_gpu_percent"] == 50  # the run's metadata is in the file


def test_the_compression_ablation_runs_lm_eval_tasks_under_each_setting(tmp_path):
    """The offline pydoc tasks are found without --lm-eval-include; a plot per task is written."""
    script = os.path.join(os.path.dirname(__file__), "..", "..", "experiments", "ablate_compression.py")
    args = ["--smoke", "true", "--max-settings", "3", "--out-dir", str(tmp_path), "--lm-eval-tasks", "pydoc_order"]
    done = subprocess.run([sys.executable, script, *args], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    import pandas as pd

    df = pd.read_csv(next(tmp_path.glob("ablate_compression_*.csv")))
    accs = df["lm_eval:pydoc_order:acc,none"]
    assert len(df) == 3 and accs.between(0, 1).all() and accs.iloc[0] >= 0.6  # the baseline knows word order
    assert not [c for c in df if c.startswith("lm_eval:") and "," not in c]  # metrics only (no sample_len)
    assert len(list(tmp_path.glob("ablate_compression_*_pydoc_order.png"))) == 1


def test_a_compressed_cache_is_scored_through_decode_where_its_cost_shows(hf, tmp_path):
    """A prefill never reads the cache back, so a 2-bit cache would score as if exact; such a
    policy feeds each token through decode. Uncompressed, decode and prefill agree."""
    path, reqs = str(pydoc_model_path()), requests("loglikelihood", CONTEXTS)
    exact = [lp for lp, _ in hf.loglikelihood(reqs)]
    cached = FlexlabLM(pretrained=path, dtype="float32", compress_cache="2:64", offload_dir=str(tmp_path))
    prefilled = FlexlabLM(
        pretrained=path, dtype="float32", compress_cache="2:64", teacher_forced=False, offload_dir=str(tmp_path)
    )
    decoded = FlexlabLM(pretrained=path, dtype="float32", teacher_forced=True, offload_dir=str(tmp_path))
    assert cached.teacher_forced and not prefilled.teacher_forced
    assert cached.get_model_info()["flexlab"]["loglikelihood_by"] == "teacher-forced decode"
    lossy = [lp for lp, _ in cached.loglikelihood(reqs)]
    assert max(abs(a - b) for a, b in zip(lossy, exact)) > 1e-3  # the 2-bit cache costs something
    assert [lp for lp, _ in prefilled.loglikelihood(reqs)] == pytest.approx(exact, abs=1e-4)
    assert [lp for lp, _ in decoded.loglikelihood(reqs)] == pytest.approx(exact, abs=1e-4)
    text = [("The for statement is used to iterate over the elements of a sequence. " * 40,)]  # windows of 512
    rolling = requests("loglikelihood_rolling", text)
    assert decoded.loglikelihood_rolling(rolling) == pytest.approx(hf.loglikelihood_rolling(rolling), rel=1e-5)


def test_a_saved_policy_is_a_model_arg_and_the_arguments_beside_it_replace_its_fields(tmp_path):
    saved = flexlab.Policy.from_percent([0, 50, 0, 100, 100, 0], gpu_batch_size=3, num_gpu_batches=2)
    (tmp_path / "p.json").write_text(json.dumps(saved.to_dict()))
    lm = FlexlabLM(pretrained=str(pydoc_model_path()), policy_file=str(tmp_path / "p.json"), batch_size=1)
    assert lm.policy == saved  # lm-eval's --batch_size (1 unless given) does not undo the search's batches
    sparse = FlexlabLM(pretrained=str(pydoc_model_path()), policy_file=str(tmp_path / "p.json"), attn_sparsity=0.1)
    assert sparse.policy == saved.replace(attn_sparsity=0.1) and sparse.teacher_forced  # sparse acts in decode
    lm = FlexlabLM(pretrained=str(pydoc_model_path()), policy_file=str(tmp_path / "p.json"), compress_cache="4:64")
    assert lm.policy == saved.replace(compress_cache=flexlab.CacheQuantConfig.parse("4:64"))
    with pytest.raises(flexlab.FlexlabError, match="policy_file=.*missing.json"):
        FlexlabLM(pretrained=str(pydoc_model_path()), policy_file=str(tmp_path / "missing.json"))


def test_bad_model_args_are_refused_by_name():
    with pytest.raises(flexlab.FlexlabError, match="percent='20:30:0' is not six numbers"):
        FlexlabLM(pretrained=str(pydoc_model_path()), percent="20:30:0")
    with pytest.raises(flexlab.FlexlabError, match="percent='a:b:c:d:e:f' is not six numbers"):
        FlexlabLM(pretrained=str(pydoc_model_path()), percent="a:b:c:d:e:f")
    with pytest.raises(flexlab.FlexlabError, match="compress_weight='5:64': .*bits=5 is invalid; use one of"):
        FlexlabLM(pretrained=str(pydoc_model_path()), compress_weight="5:64")
    with pytest.raises(flexlab.FlexlabError, match="unknown \\['gpu_batches'\\]"):
        FlexlabLM(pretrained=str(pydoc_model_path()), gpu_batches=2)
    with pytest.raises(flexlab.FlexlabError, match="dtype='float33' is not a torch dtype"):
        FlexlabLM(pretrained=str(pydoc_model_path()), dtype="float33")
    with pytest.raises(flexlab.FlexlabError, match="give pretrained=DIR"):
        FlexlabLM()
