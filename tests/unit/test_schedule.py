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


# ---- pipelines: a rank's share of the stages, hand-offs, groups of batches --------------------
def rank_schedules(counts, tokens=3, batches=4, groups=1, act_moves=False):
    """Each rank's schedule for layer counts ``counts`` (one process with ``[n]``)."""
    from flexlab.engine.schedule import share_of

    n = sum(counts)
    stages, start, out = make_stages(n, sep_layer=False), 0, []
    for c in counts:
        share = share_of(stages, range(start, start + c), n)
        peers = len(counts) > 1
        out.append(
            list(block_schedule(tokens, share, batches, prefetch=1, act_moves=act_moves, peers=peers, groups=groups))
        )
        start += c
    return out


def run_ring(schedules):
    """Run every rank's steps in order as the executor does: a recv is posted and the rank goes
    on; a compute waits until the messages it reads have come; messages between two ranks match
    posted recvs in order. Returns (rank, recv, the send it got); fails on a deadlock."""
    from collections import deque

    inbox = [deque() for _ in schedules]  # sends not yet matched
    posted = [deque() for _ in schedules]  # recvs not yet matched
    done: list[dict] = [{} for _ in schedules]  # recv key -> the send it got
    pos, got = [0] * len(schedules), []

    def match(r):
        while inbox[r] and posted[r]:
            recv, sent = posted[r].popleft(), inbox[r].popleft()
            done[r][recv.key] = sent
            got.append((r, recv, sent))

    moved = True
    while moved:
        moved = False
        for r, steps in enumerate(schedules):
            while pos[r] < len(steps):
                s = steps[pos[r]]
                if s.kind == "compute" and any(d[0] == "recv" and d not in done[r] for d in s.deps):
                    break
                if s.kind == "recv":
                    posted[r].append(s)
                elif s.kind == "send":
                    inbox[(r + 1) % len(schedules)].append(s)
                    match((r + 1) % len(schedules))
                match(r)
                pos[r] += 1
                moved = True
    assert pos == [len(s) for s in schedules], f"deadlock at {pos}"
    assert not any(inbox) and not any(posted), "a message nobody received"
    return got


@pytest.mark.parametrize("counts", [[1, 1], [1, 2, 1], [3, 1]])
@pytest.mark.parametrize("groups", [1, 2, 3])
def test_ranks_hand_each_batch_to_the_next_and_tokens_back_in_order(counts, groups):
    schedules = rank_schedules(counts, groups=groups)
    for steps in schedules:
        seen = set()
        for s in steps:
            assert all(d in seen for d in s.deps), f"{s} before its dependency"
            seen.add(s.key)
    for r, recv, sent in run_ring(schedules):
        assert recv.batch == sent.batch
        # a hidden state of the same token, or the head's next tokens for the token after
        assert recv.token == sent.token + (1 if r == 0 else 0)
    n_stage = sum(counts) + 2
    heads = [s for s in schedules[-1] if s.kind == "send"]
    assert len(heads) == 2 * 4 and all(s.stage == n_stage - 1 for s in heads)  # tokens 0 and 1 of 4 batches


@pytest.mark.parametrize("groups", [1, 2])
def test_one_process_has_no_hand_offs_and_the_same_computes_with_groups(groups):
    (steps,) = rank_schedules([2], groups=groups)
    assert not [s for s in steps if s.kind in ("recv", "send")]
    computes = [(s.token, s.stage, s.batch) for s in steps if s.kind == "compute"]
    assert sorted(computes) == sorted((t, j, k) for t in range(3) for j in range(4) for k in range(4))


def test_groups_take_turns_and_each_loads_a_stages_weights_once_per_token():
    (steps,) = rank_schedules([2], batches=5, groups=2)  # groups: batches 0-2 and 3-4
    computes = [(s.token, s.stage, s.batch) for s in steps if s.kind == "compute"]
    first = [(0, j, k) for j in range(4) for k in range(3)] + [(0, j, k) for j in range(4) for k in (3, 4)]
    assert computes[: len(first)] == first
    loads = [(s.token, s.stage, s.batch) for s in steps if s.kind == "load_weight"]
    assert len(loads) == len(set(loads)) == 3 * 4 * 2  # tokens x stages x groups
    for s in steps:
        if s.kind == "compute":
            weight = [d for d in s.deps if d[0] == "load_weight"]
            assert weight == [("load_weight", s.token, s.stage, 0 if s.batch < 3 else 1)]
            assert (weight[0] in s.releases) == (s.batch in (2, 4))  # after the group's last batch
