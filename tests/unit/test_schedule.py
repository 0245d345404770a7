"""The block schedule, read as data: order, dependencies, and what overlap changes."""

import pytest

from flexlab.engine.schedule import block_schedule, make_stages


def steps(tokens=3, layers=2, batches=3, prefetch=1, act_moves=True, sep_layer=True, cache_ahead=None):
    return list(
        block_schedule(
            tokens,
            make_stages(layers, sep_layer),
            batches,
            prefetch=prefetch,
            act_moves=act_moves,
            cache_ahead=cache_ahead,
        )
    )


@pytest.mark.parametrize("prefetch, cache_ahead", [(0, None), (1, None), (1, 4)])
@pytest.mark.parametrize("act_moves", [False, True])
@pytest.mark.parametrize("batches", [1, 3])
def test_every_step_comes_after_its_dependencies_and_once(prefetch, cache_ahead, act_moves, batches):
    seen = set()
    for s in steps(batches=batches, prefetch=prefetch, act_moves=act_moves, cache_ahead=cache_ahead):
        assert s.key not in seen, f"{s} issued twice"
        for d in s.deps:
            assert d in seen, f"{s} issued before its dependency {d}"
        seen.add(s.key)


def test_compute_order_is_token_stage_batch_and_complete():
    stages = make_stages(2, sep_layer=True)
    computes = [(s.token, s.stage, s.batch) for s in steps() if s.kind == "compute"]
    assert computes == [(t, j, k) for t in range(3) for j in range(len(stages)) for k in range(3)]


def test_one_weight_load_serves_the_whole_block():
    loads = [(s.token, s.stage) for s in steps() if s.kind == "load_weight"]
    assert len(loads) == len(set(loads)) == 3 * len(make_stages(2, True))


def test_compute_needs_weights_cache_and_activations():
    for s in steps():
        if s.kind != "compute":
            continue
        kinds = {d[0] for d in s.deps}
        assert "load_weight" in kinds
        has_cache = s.stage in (1, 3)  # attention stages of a 2-layer model with sep_layer
        assert ("load_cache" in kinds) == (has_cache and s.token > 0)
        assert ("load_act" in kinds) == (s.stage > 0)


def test_stores_follow_their_compute_and_cache_is_stored_once_per_token():
    seq = steps()
    stores = [s for s in seq if s.kind == "store_cache"]
    assert len(stores) == len({s.key for s in stores}) == 3 * 2 * 3  # tokens × layers × batches
    for s in stores:
        assert s.deps == (("compute", s.token, s.stage, s.batch),)


def test_with_overlap_next_stage_weights_load_during_all_batches():
    seq = [str(s) for s in steps(prefetch=1)]
    assert seq.index("load_weight t=0 stage=2") < seq.index("compute t=0 stage=1 batch=0")
    seq = [str(s) for s in steps(prefetch=0)]
    assert seq.index("load_weight t=0 stage=2") > seq.index("compute t=0 stage=1 batch=2")


def test_without_overlap_each_load_comes_right_before_its_compute():
    seq = steps(prefetch=0)
    for i, s in enumerate(seq):
        if s.kind.startswith("load"):
            nxt = next(x for x in seq[i:] if x.kind == "compute")
            assert s.token == nxt.token and s.stage == nxt.stage
            assert s.batch in (None, nxt.batch)


def test_weights_are_released_after_the_last_batch():
    for s in steps():
        if s.kind == "compute":
            released = [r for r in s.releases if r[0] == "load_weight"]
            assert released == ([("load_weight", s.token, s.stage, None)] if s.batch == 2 else [])


@pytest.mark.parametrize("ahead", [1, 4])
def test_cache_loads_run_ahead_through_the_mlp_stage(ahead):
    """With the cache read ``ahead`` units early, the next attention stage's first batches are
    requested while the MLP stage (which reads no cache) computes; never more than ``ahead``."""
    order = steps(tokens=2, layers=2, batches=3, act_moves=False, cache_ahead=ahead)
    units = [(s.token, s.stage, s.batch) for s in order if s.kind == "compute"]
    position = {u: i for i, u in enumerate(units)}
    computed = 0
    for s in order:
        if s.kind == "compute":
            computed += 1
        elif s.kind == "load_cache":
            assert position[(s.token, s.stage, s.batch)] - computed <= ahead  # at most ``ahead`` beyond the next
    mlp = 2  # stage 2 is layer 0's MLP; stage 3 is layer 1's attention
    mlp_ends = order.index(next(s for s in order if s.key == ("compute", 1, mlp, 2)))
    requested = [(s.stage, s.batch) for s in order[:mlp_ends] if s.kind == "load_cache" and s.token == 1]
    assert [r for r in requested if r[0] == mlp + 1] == [(mlp + 1, k) for k in range(min(ahead, 3))]


@pytest.mark.parametrize("act_moves", [False, True])
def test_each_token_is_embedded_from_the_heads_output_of_the_one_before(act_moves):
    """The feedback from token t's head to token t+1's embedding is a dependency like any other
    (a schedule spread over processes can send it), and the head's value lives till it is read."""
    seq = steps(act_moves=act_moves)
    head = len(make_stages(2, True)) - 1
    computes = {s.key: s for s in seq if s.kind == "compute"}
    for (_, t, j, k), s in computes.items():
        feedback = ("compute", t - 1, head, k)
        assert (feedback in s.deps and feedback in s.releases) == (j == 0 and t > 0)
        if j == head:
            assert (s.key in s.releases) == (t == 2)  # only the last token's head frees itself
