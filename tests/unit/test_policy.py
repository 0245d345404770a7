import json

import pytest

from flexlab import CacheQuantConfig, Policy, PolicyError, QuantConfig, QuantError
from flexlab.cli_args import policy_flags, policy_from_flags


def test_defaults_put_everything_on_the_gpu_tier():
    p = Policy()
    assert (p.w_disk_percent, p.cache_disk_percent, p.act_tier, p.block_size) == (0, 0, "gpu", 1)


def test_from_percent_takes_flexgens_six_numbers():
    p = Policy.from_percent([20, 30, 0, 100, 0, 0], gpu_batch_size=8, num_gpu_batches=4)
    assert (p.w_gpu_percent, p.w_cpu_percent, p.w_disk_percent) == (20, 30, 50)
    assert (p.cache_cpu_percent, p.act_tier, p.block_size) == (100, "disk", 32)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(w_gpu_percent=120), r"w_gpu_percent=120 is invalid; shares are percentages in \[0, 100\]"),
        (dict(cache_cpu_percent=-5), "cache_cpu_percent=-5 is invalid"),
        (dict(w_gpu_percent=60, w_cpu_percent=50), "w_gpu_percent \\+ w_cpu_percent = 60 \\+ 50 > 100"),
        (dict(gpu_batch_size=0), "gpu_batch_size=0 is invalid; it must be an int >= 1"),
        (dict(num_gpu_batches=1.5), "num_gpu_batches=1.5 is invalid"),
        (dict(attn_sparsity=0), r"attn_sparsity=0 is invalid; it must be in \(0, 1\]"),
        (dict(act_gpu_percent=50, act_cpu_percent=50), "splits activations across tiers"),
        (dict(overlap="yes"), "overlap='yes' is invalid"),
    ],
)
def test_invalid_values_name_the_field_and_the_fix(kwargs, message):
    with pytest.raises(PolicyError, match=message):
        Policy(**kwargs)


def test_policy_is_frozen_and_keyword_only():
    with pytest.raises(TypeError):
        Policy(1, 2)  # type: ignore[misc]
    with pytest.raises(AttributeError):
        Policy().w_gpu_percent = 0  # type: ignore[misc]


def test_from_percent_needs_six_numbers():
    with pytest.raises(PolicyError, match="six numbers"):
        Policy.from_percent([100, 0, 100, 0])


def test_policy_shows_itself_in_a_notebook():
    html = Policy.from_percent([20, 30, 0, 100, 100, 0])._repr_html_()
    assert "<table>" in html and "50%" in html


@pytest.mark.parametrize(
    "policy",
    [
        Policy(),
        Policy.from_percent([100 / 3, 50, 0, 100, 0, 0], gpu_batch_size=3, num_gpu_batches=5, overlap=False),
        Policy(
            compress_weight=QuantConfig(bits=3, group_size=32),
            compress_cache=CacheQuantConfig(bits=2, group_size=64, kv_layout="per-channel"),
            attn_sparsity=0.25,
        ),
        Policy.from_percent([0, 0, 0, 100, 0, 100], cpu_cache_compute=True),
        Policy.from_percent([0, 50, 0, 0, 0, 100], sep_layer=False, pin_weight=False, gpu_batch_size=32),
    ],
)
def test_printed_flags_make_the_same_policy(policy):
    assert policy_from_flags(policy_flags(policy)) == policy


def test_a_policy_no_flags_express_says_which_fields():
    with pytest.raises(ValueError, match="no flags set compress_cache=.*--policy FILE"):
        policy_flags(Policy(compress_cache=CacheQuantConfig(bits=4, window=8)))


def test_flexgen_spellings_make_flexgens_policy():
    """FlexGen's own command for OPT-175B on a T4, with compression, as its README spells it."""
    flags = (
        "--percent 0 50 0 0 0 100 --gpu-batch-size 32 --num-gpu-batches 8 --cpu-cache-compute "
        "--pin-weight 0 --sep-layer False --overlap False --compress-weight"
    )
    q4 = QuantConfig(bits=4, group_size=64)
    expected = Policy.from_percent(
        [0, 50, 0, 0, 0, 100],
        gpu_batch_size=32,
        num_gpu_batches=8,
        cpu_cache_compute=True,
        pin_weight=False,
        sep_layer=False,
        overlap=False,
        compress_weight=q4,
    )
    assert policy_from_flags(flags) == expected
    assert policy_from_flags("--compress-cache --overlap true").compress_cache == CacheQuantConfig.of(q4)


def test_a_flag_that_is_not_a_boolean_is_refused_by_name():
    with pytest.raises(SystemExit):  # argparse prints the one-line reason and exits 2
        policy_from_flags("--overlap maybe")
    with pytest.raises(ValueError, match="--no-overlap and --overlap True disagree"):
        policy_from_flags("--no-overlap --overlap True")


def test_cache_settings_live_on_the_cache_config_only():
    """kv_layout and window belong to CacheQuantConfig; a plain QuantConfig for the cache is taken as one."""
    plain = Policy(compress_cache=QuantConfig(bits=3, group_size=32))
    assert plain.compress_cache == CacheQuantConfig(bits=3, group_size=32)
    assert plain == Policy(compress_cache=CacheQuantConfig(bits=3, group_size=32))
    assert QuantConfig.parse("4:64") == QuantConfig(bits=4, group_size=64)
    assert CacheQuantConfig.parse("2:32:per-channel").kv_layout == "per-channel"
    with pytest.raises(QuantError, match="KV cache only; weights take BITS"):
        QuantConfig.parse("2:32:per-channel")
    cached = Policy(compress_weight=QuantConfig(bits=4), compress_cache=CacheQuantConfig(bits=2, window=4))
    assert Policy.from_dict(json.loads(json.dumps(cached.to_dict()))) == cached
    # a policy file written before the split carries the cache fields, at their defaults, on the weights
    old = cached.to_dict()
    old["compress_weight"].update(kv_layout="per-token", window=0)
    assert Policy.from_dict(old) == cached
    old["compress_weight"]["window"] = 8
    with pytest.raises(QuantError, match="unknown QuantConfig field.*window"):
        Policy.from_dict(old)


def test_a_saved_policy_loads_back_and_a_bad_file_says_what_is_wrong(tmp_path):
    saved = Policy.from_percent([10, 40, 0, 100, 100, 0], gpu_batch_size=4, num_gpu_batches=3)
    (tmp_path / "p.json").write_text(json.dumps(saved.to_dict()))
    assert Policy.load(tmp_path / "p.json") == saved
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(PolicyError, match="cannot read a JSON policy"):
        Policy.load(tmp_path / "bad.json")
    (tmp_path / "wrong.json").write_text(json.dumps({"w_gpu_percent": 120}))
    with pytest.raises(PolicyError, match="w_gpu_percent=120"):
        Policy.load(tmp_path / "wrong.json")
    with pytest.raises(PolicyError, match="cannot read"):
        Policy.load(tmp_path / "missing.json")
