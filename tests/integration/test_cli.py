"""Every ``flexlab`` command on a tiny model; bad input gives one line on stderr and exit status 2."""

from __future__ import annotations

import io
import json
import re

import pytest
import torch

import flexlab
from flexlab.cli import main
from flexlab.cost import get_hardware
from tests.conftest import write_bin_checkpoint


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_generate_with_flexgen_flags_and_a_policy_file(capsys, tmp_path):
    code, out, err = run(
        capsys,
        "generate",
        "--preset",
        "opt-tiny",
        "--dtype",
        "float32",
        "--prompt-ids",
        "2 5 6",
        "--prompt-ids",
        "2 7",
        "--percent",
        "0",
        "50",
        "0",
        "100",
        "100",
        "0",
        "--max-new-tokens",
        "3",
        "--timeline",
        str(tmp_path / "tl.json"),
    )
    assert code == 0 and out.count(">>> ") == 2 and "w 0/50/50 cache 0/100/0" in err
    assert len(flexlab.Timeline.load(tmp_path / "tl.json")) > 0
    expected = flexlab.Model.from_config("opt-tiny", dtype=torch.float32).generate([[2, 5, 6]], max_new_tokens=3)
    assert f"[2, 5, 6] -> {expected.token_ids[0]}" in out
    policy = flexlab.Policy.from_percent(
        [0, 0, 100, 0, 0, 100],
        gpu_batch_size=1,
        num_gpu_batches=2,
        compress_cache=flexlab.QuantConfig(bits=8, group_size=16),
    )
    (tmp_path / "p.json").write_text(json.dumps(policy.to_dict()))
    code, out, err = run(
        capsys,
        "generate",
        "--preset",
        "opt-tiny",
        "--prompt-ids",
        "2 5 6",
        "--policy",
        str(tmp_path / "p.json"),
        "--max-new-tokens",
        "2",
    )
    assert code == 0 and "batch 1x2" in err and "cache 8-bit g16" in err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["generate", "--preset", "opt-tiny"], "no prompts"),
        (
            ["generate", "--preset", "opt-tiny", "--prompt-ids", "2 5", "--percent", "80", "40", "0", "0", "0", "0"],
            "w_gpu_percent \\+ w_cpu_percent = 80.0 \\+ 40.0 > 100",
        ),
        (["generate", "--preset", "opt-tiny", "--prompt-ids", "2 5", "--compress-weight", "4:x"], "is not BITS"),
        (["generate", "--preset", "opt-huge", "--prompt-ids", "2"], "opt-huge"),
        (["generate", "--percent", "1", "2"], "expected 6 arguments"),
        (["bench", "--frobnicate"], "unrecognized arguments: --frobnicate"),
        (["search", "--preset", "opt-1.3b", "--gpu-mem", "-1"], "capacity must be positive"),
        (["search", "--preset", "opt-1.3b", "--hardware", "tpu"], "unknown hardware 'tpu'"),
        (["search", "--preset", "opt-1.3b", "--one-machine"], "--one-machine describes the stages of a pipeline"),
        (["generate", "--preset", "opt-tiny", "--prompt-ids", "2", "--overlap", "maybe"], "'maybe' is not a boolean"),
        (["generate", "--preset", "opt-tiny", "--prompt", "hi"], "no tokenizer: pass token ids \\(--prompt-ids"),
        (["chat", "--preset", "opt-tiny"], "chat needs text: pass --model DIR"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(capsys, argv, message):
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own errors
        code = e.code
    lines = [line for line in capsys.readouterr().err.splitlines() if "error" in line or "Traceback" in line]
    assert code == 2 and len(lines) == 1 and re.search(message, lines[0])


def test_bench_sweep_writes_its_results(capsys, tmp_path):
    code, out, _ = run(
        capsys,
        "bench",
        "--preset",
        "opt-tiny",
        "--sweep",
        "--prompt-len",
        "8",
        "--gen-len",
        "2",
        "--gpu-batch-size",
        "2",
        "--num-gpu-batches",
        "1",
        "--out",
        str(tmp_path),
    )
    assert code == 0 and "weights on disk" in out
    assert {p.name for p in tmp_path.iterdir()} == {"bench.csv", "bench.json", "throughput.png", "memory.png"}
    assert len(json.loads((tmp_path / "bench.json").read_text())["policies"]) == 6


def test_search_prints_a_policy_that_fits_and_saves_it(capsys, tmp_path):
    # --cpu-mem is the whole process's host RAM: colab-t4's runtime base (1.5 GiB) and 1.3 GiB more, of
    # which the search keeps 10% free
    argv = ["search", "--preset", "opt-1.3b", "--gpu-mem", "1.5", "--cpu-mem", "2.8", "--prompt-len", "64"]
    argv += ["--gen-len", "8"]
    code, out, _ = run(capsys, *argv, "--save-policy", str(tmp_path / "p.json"))
    assert code == 0 and "bottleneck" in out and "--percent" in out
    policy = flexlab.Policy.from_dict(json.loads((tmp_path / "p.json").read_text()))
    assert policy.w_gpu_percent < 100  # 2.5 GB of weights do not fit 1.5 GiB
    code, verbose, _ = run(capsys, *argv, "--verbose")
    assert code == 0 and verbose.startswith(out.split("wrote")[0].rstrip("\n"))  # the same answer, then detail
    assert re.search(r"^attention [\d,\-…]+.*\d+\.\d{4}", verbose, re.M) and "best of " in verbose


def test_search_tries_each_compression_given_and_prints_flags_for_its_pick(capsys, tmp_path):
    from flexlab.cli_args import policy_from_flags

    argv = ["search", "--preset", "opt-125m", "--gpu-mem", "0.135", "--cpu-mem", "2.0", "--prompt-len", "64"]
    argv += ["--gen-len", "8", "--compress", "3:64,8:32:per-channel", "--save-policy", str(tmp_path / "p.json")]
    code, out, _ = run(capsys, *argv)
    policy = flexlab.Policy.from_dict(json.loads((tmp_path / "p.json").read_text()))
    assert code == 0 and policy_from_flags(re.search(r"^flags: (.*)$", out, re.M).group(1)) == policy
    # 250 MB of float16 weights fit neither 0.135 GiB of GPU less 10% nor, beside the process's 1.5 GiB
    # base, 2 GiB of host memory less 10% (from 2.05 the search keeps them there uncompressed: the
    # embedding reads only its rows of the table); 3-bit weights do (per-channel is the cache's only)
    assert policy.compress_weight == flexlab.QuantConfig(bits=3, group_size=64)
    assert policy.compress_cache in (
        None,
        flexlab.CacheQuantConfig.parse("3:64"),
        flexlab.CacheQuantConfig.parse("8:32:per-channel"),
    )


def test_search_places_llama_3_1_8b_on_a_t4_with_compression(capsys, tmp_path):
    from flexlab.cli_args import policy_from_flags

    code, out, _ = run(
        capsys,
        "search",
        "--preset",
        "llama-3.1-8b",
        "--hardware",
        "colab-t4",
        "--compress",
        "--save-policy",
        str(tmp_path / "p.json"),
    )
    lines = out.splitlines()  # the answer first: throughput, policy, time and bottleneck, memory, flags
    assert code == 0 and re.match(r"llama-3.1-8b on colab-t4 .*: [\d.]+ tok/s predicted$", lines[0])
    assert lines[1].startswith("policy: ") and re.search(r"bottleneck: \w+ \(busy \d+%", lines[2])
    assert lines[3].startswith("peak GiB: ") and lines[5].startswith("flags: ")
    host = re.match(r"process peak GiB: host ([\d.]+), gpu ([\d.]+) ", lines[4])  # the whole process fits too
    assert host and float(host.group(1)) <= 12.0 and float(host.group(2)) <= 15.0
    assert "compute s" not in out  # the per-stage table only with --verbose
    policy = flexlab.Policy.from_dict(json.loads((tmp_path / "p.json").read_text()))
    # 16 GB of bfloat16 weights do not fit a T4's GPU; 4-bit ones (about 4.5 GB) do
    assert policy.compress_weight is not None and policy.compress_weight.bits == 4
    flags = re.search(r"^flags: (.*)$", out, re.M).group(1)  # copying the line runs exactly this policy
    assert policy_from_flags(flags) == policy
    peak = re.search(r"peak GiB: gpu ([\d.]+) of 15.00", out)
    assert peak and float(peak.group(1)) <= 15.0


def test_calibrate_writes_a_profile(quick_profile):
    """The suite's one calibration (conftest's session fixture): its values in range, its file read back."""
    path, done = quick_profile
    assert done.returncode == 0 and "disk_read_bw" in done.stdout, done.stderr[-2000:]
    hw = get_hardware(path)
    assert hw.matmul_flops > 1e9 and hw.disk_read_bw > 1e6 and not hw.has_link and 0 < hw.step_overhead_s < 0.1
    assert hw.dequant_elems > 1e6 and 0 <= hw.dequant_call_s < 0.1 and hw.runtime_base_bytes > 50e6
    assert 1e6 < hw.kv_codec_elems < 1e12 and 0 <= hw.kv_codec_call_s < 0.1 and 0 <= hw.cache_transfer_overhead_s < 0.1
    assert 1e6 < hw.sparse_value_bw < 1e13 and 0 <= hw.sparse_call_s < 0.1
    if hw.llc_bytes:  # MiB, not "0.0 GiB"
        assert re.search(r"^llc_bytes +[1-9]\d* MiB$", done.stdout, re.M), done.stdout
    assert list((path.parent / "probes").iterdir()) == []  # the probe files are gone


def test_convert_writes_safetensors_the_engine_reads_in_place(capsys, tmp_path, tiny_hf):
    src = tmp_path / "bin"
    write_bin_checkpoint(tiny_hf, src)
    code, _, _ = run(capsys, "convert", str(src), str(tmp_path / "st"), "--dtype", "float32")
    assert code == 0 and (tmp_path / "st" / "model.safetensors").exists()
    a = flexlab.Model.from_pretrained(src, dtype=torch.float32)
    b = flexlab.Model.from_pretrained(tmp_path / "st", dtype=torch.float32)
    assert b.weights.location(next(iter(b.weights.specs))) is not None  # readable in place
    assert a.generate([[2, 5, 6]], max_new_tokens=4).token_ids == b.generate([[2, 5, 6]], max_new_tokens=4).token_ids
    code, _, err = run(capsys, "convert", str(src), str(tmp_path / "st"))
    assert code == 2 and "is not empty" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bin", "st"]  # no temporary left behind


def test_convert_random_writes_a_checkpoint_transformers_loads(capsys, tmp_path):
    from transformers import OPTForCausalLM

    code, out, _ = run(
        capsys, "convert", "opt-tiny", str(tmp_path / "rnd"), "--random", "--dtype", "float32", "--seed", "3"
    )
    assert code == 0 and (tmp_path / "rnd" / "config.json").exists()
    ours = flexlab.Model.from_config("opt-tiny", seed=3, dtype=torch.float32)
    hf = OPTForCausalLM.from_pretrained(tmp_path / "rnd", dtype=torch.float32)  # every weight loaded, none new
    seq = [2, 5, 6, 9]
    with torch.no_grad():
        logprobs = torch.log_softmax(hf(torch.tensor([seq])).logits[0, :-1], dim=-1)
    expected = logprobs.gather(-1, torch.tensor(seq[1:])[:, None]).squeeze(-1)
    assert torch.allclose(ours.score([seq])[0], expected, atol=1e-5)
    code, _, err = run(capsys, "convert", "opt-nope", str(tmp_path / "other"), "--random")
    assert code == 2 and "opt-nope" in err and not (tmp_path / "other").exists()


@pytest.mark.slow
def test_demo_generates_the_reference_tokens_and_writes_its_timeline(capsys, tmp_path):
    """The README's main job (``make demo``) on the pydoc model."""
    argv = ["demo", "--max-new-tokens", "6", "--repeats", "2", "--out", str(tmp_path), "--offload-dir", str(tmp_path)]
    code, out, _ = run(capsys, *argv)
    assert code == 0 and "same tokens: yes" in out
    assert re.search(r"median of 2 runs [\d.]+ tokens/s \(runs [\d.]+-[\d.]+\)", out) and "offloaded / reference" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["timeline.json", "timeline.png", "trace.json"]
    assert len(flexlab.Timeline.load(tmp_path / "timeline.json")) > 0


@pytest.mark.slow
def test_chat_answers_each_line_and_keeps_history(capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("What is a list?\nAnd a tuple?\n\n"))
    code, out, _ = run(capsys, "chat", "--max-new-tokens", "12")
    assert code == 0 and out.count("Assistant: ") == 2


def test_chat_prompt_keeps_the_newest_turns_that_fit():
    from flexlab.chat import Chat

    def echo(prompts, max_new_tokens, stop_strings, **kw):
        from types import SimpleNamespace

        return SimpleNamespace(texts=[" fine, thanks" + stop_strings[0] + " more"])

    chat = Chat(echo, tokenizer=None, max_positions=120, max_new_tokens=20)
    assert chat.reply("hello") == "fine, thanks"  # cut at the next human turn
    for i in range(10):
        chat.reply(f"question number {i}")
    prompt = chat.prompt("last one")
    assert "question number 9" in prompt and "question number 0" not in prompt
    assert prompt.endswith("Human: last one\nAssistant:")
    with pytest.raises(ValueError, match="too long"):
        chat.prompt("x" * 1000)


# ---- the error net: every bad path or file is one line, before any work -----------------------------
def _tiny_args():
    return ["--preset", "opt-tiny", "--dtype", "float32"]


def _malformed(tmp_path, tiny_dir, what: str):
    import shutil

    d = tmp_path / "ckpt"
    shutil.copytree(tiny_dir, d)
    if what == "config":
        cfg = json.loads((d / "config.json").read_text())
        del cfg["hidden_size"]
        (d / "config.json").write_text(json.dumps(cfg))
    else:
        (d / "model.safetensors").write_bytes((7).to_bytes(8, "little") + b"[1,2,3]")
    return str(d)


BAD_PATHS = {  # name: (argv from tmp_path and a checkpoint dir, what the one line must say)
    "prompts-file is a directory": (
        lambda t, c: ["generate", *_tiny_args(), "--prompts-file", str(t)],
        "--prompts-file .*: is a directory",
    ),
    "prompts-file missing": (
        lambda t, c: ["generate", *_tiny_args(), "--prompts-file", str(t / "nope.txt")],
        "--prompts-file .*: does not exist",
    ),
    "prompts-file not text": (
        lambda t, c: ["generate", *_tiny_args(), "--prompts-file", _binary(t)],
        "--prompts-file .*: cannot read it as text",
    ),
    "timeline is a directory": (
        lambda t, c: ["generate", *_tiny_args(), "--prompt-ids", "2 5", "--timeline", str(t)],
        "--timeline .*: is a directory",
    ),
    "timeline read-only place": (
        lambda t, c: ["generate", *_tiny_args(), "--prompt-ids", "2 5", "--timeline", "/proc/flexlab/t.json"],
        "--timeline .*cannot create it",
    ),
    "timeline under a file": (
        lambda t, c: ["generate", *_tiny_args(), "--prompt-ids", "2 5", "--timeline", _file(t) + "/t.json"],
        "--timeline .*is a file",
    ),
    "bench out is a file": (lambda t, c: ["bench", *_tiny_args(), "--out", _file(t)], "--out .*: is a file"),
    "bench out read-only": (
        lambda t, c: ["bench", *_tiny_args(), "--out", "/proc/flexlab-bench"],
        "--out .*cannot create it",
    ),
    "calibrate out is a directory": (lambda t, c: ["calibrate", "--quick", "--out", str(t)], "--out .*is a directory"),
    "calibrate offload-dir is a file": (
        lambda t, c: ["calibrate", "--quick", "--out", str(t / "hw.json"), "--offload-dir", _file(t)],
        "--offload-dir .*: is a file",
    ),
    "calibrate offload-dir read-only": (
        lambda t, c: ["calibrate", "--quick", "--out", str(t / "hw.json"), "--offload-dir", "/proc/flexlab-x"],
        "--offload-dir .*cannot",
    ),
    "convert target is a file": (lambda t, c: ["convert", "opt-tiny", _file(t), "--random"], "is a file; the target"),
    "convert target read-only": (
        lambda t, c: ["convert", "opt-tiny", "/proc/flexlab-x/ckpt", "--random"],
        "cannot write a checkpoint in /proc/flexlab-x",
    ),
    "search save-policy is a directory": (
        lambda t, c: ["search", "--preset", "opt-1.3b", "--save-policy", str(t)],
        "--save-policy .*is a directory",
    ),
    "policy JSON of the wrong shape": (
        lambda t, c: ["generate", *_tiny_args(), "--prompt-ids", "2 5", "--policy", _json(t, [1, 2])],
        "a policy is a JSON object",
    ),
    "policy unknown QuantConfig key": (
        lambda t, c: [
            "generate",
            *_tiny_args(),
            "--prompt-ids",
            "2 5",
            "--policy",
            _json(t, {"compress_weight": {"bitz": 4}}),
        ],
        r"unknown QuantConfig field\(s\) \['bitz'\]",
    ),
    "policy is a directory": (
        lambda t, c: ["generate", *_tiny_args(), "--prompt-ids", "2 5", "--policy", str(t)],
        "--policy .*is a directory",
    ),
    "temperature nan": (
        lambda t, c: ["generate", *_tiny_args(), "--prompt-ids", "2 5", "--do-sample", "--temperature", "nan"],
        "temperature must be a finite number",
    ),
    "float token id": (
        lambda t, c: ["generate", *_tiny_args(), "--prompt-ids", "2 5.5"],
        "--prompt-ids '2 5.5': token ids are integers",
    ),
    "token id outside the vocabulary": (
        lambda t, c: ["generate", *_tiny_args(), "--prompt-ids", "2 99999"],
        r"token id 99999 is outside the vocabulary \[0, 511\]",
    ),
    "negative token id": (
        lambda t, c: ["generate", *_tiny_args(), "--prompt-ids", "2 -1"],
        "token id -1 is outside the vocabulary",
    ),
    "config lacks a field": (
        lambda t, c: ["generate", "--model", _malformed(t, c, "config"), "--prompt-ids", "2"],
        "config.json lacks 'hidden_size'",
    ),
    "malformed safetensors header": (
        lambda t, c: ["generate", "--model", _malformed(t, c, "header"), "--prompt-ids", "2"],
        "not a readable safetensors file",
    ),
}


def _file(t) -> str:
    (t / "a-file").write_text("x")
    return str(t / "a-file")


def _binary(t) -> str:
    (t / "bin.txt").write_bytes(b"\xff\xfe\x00\x81")
    return str(t / "bin.txt")


def _json(t, value) -> str:
    (t / "p.json").write_text(json.dumps(value))
    return str(t / "p.json")


@pytest.mark.parametrize("case", list(BAD_PATHS))
def test_every_bad_path_or_file_is_one_line_before_any_work(capsys, tmp_path, tiny_dir, case):
    make_argv, message = BAD_PATHS[case]
    argv = make_argv(tmp_path, tiny_dir)
    before = sorted(p.name for p in tmp_path.iterdir())
    code, out, err = run(capsys, *argv)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("flexlab: error: "), err
    assert re.search(message, lines[0]), lines[0]
    assert out == ""  # refused before any work: nothing generated, benchmarked or searched
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # and nothing written


def test_a_missing_output_parent_is_created(capsys, tmp_path):
    code, _, _ = run(
        capsys,
        "generate",
        *_tiny_args(),
        "--prompt-ids",
        "2 5",
        "--max-new-tokens",
        "2",
        "--timeline",
        str(tmp_path / "new" / "deeper" / "tl.json"),
    )
    assert code == 0 and len(flexlab.Timeline.load(tmp_path / "new" / "deeper" / "tl.json")) > 0


def test_a_full_disk_during_a_cli_run_is_one_line(capsys, tmp_path, monkeypatch):
    import errno

    import flexlab.engine.tiers as tiers

    def full(fd, data, offset):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(tiers.os, "pwrite", full)
    code, out, err = run(
        capsys,
        "generate",
        *_tiny_args(),
        "--prompt-ids",
        "2 5",
        "--percent",
        "100",
        "0",
        "0",
        "0",
        "100",
        "0",
        "--offload-dir",
        str(tmp_path),
    )
    lines = err.strip().splitlines()
    assert code == 2 and re.match(
        r"flexlab: error: the disk holding '.*' is full: writing \d+ bytes to kv_l0_b0_k.bin", lines[-1]
    )
    assert list(tmp_path.iterdir()) == []


def test_an_unexpected_error_is_one_line_and_the_traceback_on_request(capsys, monkeypatch):
    monkeypatch.setattr(flexlab.Engine, "generate", lambda *a, **k: {}["no such key"])
    code, _, err = run(capsys, "generate", *_tiny_args(), "--prompt-ids", "2 5")
    assert code == 1 and err.strip().splitlines()[-1].startswith("flexlab: internal error: KeyError")
    monkeypatch.setenv("FLEXLAB_DEBUG", "1")
    with pytest.raises(KeyError):
        main(["generate", *_tiny_args(), "--prompt-ids", "2 5"])


def _templated_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<s>", "</s>", "<unk>", "system", "user", "assistant", ":", "hi", "there", "again", "fine", "be", "kind"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    t = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    t.chat_template = (
        "<s> {% for m in messages %}{{ m['role'] }} : {{ m['content'] }} </s> {% endfor %}"
        "{% if add_generation_prompt %}assistant :{% endif %}"
    )
    return t


def test_chat_uses_the_tokenizers_chat_template_and_its_end_of_turn():
    from types import SimpleNamespace

    from flexlab.chat import Chat

    tok = _templated_tokenizer()
    calls = []

    def generate(prompts, max_new_tokens, **kw):
        calls.append((prompts[0], kw))
        return SimpleNamespace(texts=[" fine </s>"])

    chat = Chat(generate, tokenizer=tok, max_positions=40, max_new_tokens=4, system="be kind")
    assert chat.reply("hi there") == "fine"
    ids, rules = calls[0]
    assert tok.decode(ids) == "<s> system : be kind </s> user : hi there </s> assistant :"  # one <s>, no re-tokenizing
    assert rules["stop_token_ids"] == [tok.eos_token_id] and rules["stop_strings"] is None
    chat.reply("hi again")
    assert tok.decode(calls[1][0]).endswith(
        "user : hi there </s> assistant : fine </s> user : hi again </s> assistant :"
    )
    for _ in range(5):  # the oldest exchanges are dropped to fit 40 - 4 positions
        chat.reply("hi there again")
    assert len(calls[-1][0]) <= 36 and tok.decode(calls[-1][0]).startswith("<s> system : be kind")
    Chat(generate, tokenizer=tok, max_positions=40, max_new_tokens=4, eos_token_ids=[7, tok.eos_token_id]).reply("hi")
    assert calls[-1][1]["stop_token_ids"] == [tok.eos_token_id, 7]  # the model's end ids too, once each


def test_generate_appends_a_line_per_run_to_its_log_file(capsys, tmp_path):
    log = tmp_path / "logs" / "runs.jsonl"
    argv = ["generate", "--preset", "opt-tiny", "--dtype", "float32", "--prompt-ids", "2 5 6", "--max-new-tokens", "3"]
    for _ in range(2):
        code, _, _ = run(capsys, *argv, "--percent", "0", "0", "100", "0", "100", "0", "--log-file", str(log))
        assert code == 0
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(lines) == 2 and all(e["model"] == "opt-tiny" and e["new_tokens"] == 3 for e in lines)
    assert lines[0]["policy"].startswith("w 0/0/100") and lines[0]["throughput_tok_s"] > 0
