"""Disk plumbing: reads and writes land where they should, O_DIRECT or not, and deleted files
leave no descriptor behind; read buffers are sized and handed out so that two loads always fit."""

from __future__ import annotations

import threading

import pytest
import torch

from flexlab.engine.placement import ALIGN, weight_read_buffers
from flexlab.engine.tiers import BufferPool, DiskFiles, aligned_empty, preallocate


@pytest.fixture
def files():
    f = DiskFiles(io_threads=2)
    yield f
    f.close()


def test_aligned_and_unaligned_writes_read_back(files, tmp_path):
    path = tmp_path / "slot.bin"
    preallocate(path, 4 * ALIGN)
    block = torch.arange(ALIGN, dtype=torch.int32).view(torch.uint8)[:ALIGN]  # aligned size and offset: O_DIRECT
    odd = torch.full((100,), 7, dtype=torch.uint8)  # neither: buffered
    files.write(path, ALIGN, block)
    files.write(path, 3 * ALIGN + 5, odd)
    buf = aligned_empty(4 * ALIGN)
    assert torch.equal(files.read(path, ALIGN, ALIGN, buf), block)
    assert torch.equal(files.read(path, 3 * ALIGN + 5, 100, buf), odd)


def test_a_removed_file_leaves_no_descriptor_for_a_new_one_of_the_same_name(files, tmp_path):
    path = tmp_path / "kv.bin"
    preallocate(path, ALIGN)
    files.write(path, 0, torch.ones(ALIGN, dtype=torch.uint8))
    files.read(path, 0, ALIGN, aligned_empty(ALIGN))
    files.remove(path)
    assert not path.exists()
    preallocate(path, ALIGN)  # a later block's file: it must not be served the deleted one's bytes
    assert torch.equal(files.read(path, 0, ALIGN, aligned_empty(ALIGN)), torch.zeros(ALIGN, dtype=torch.uint8))
    files.remove(path)
    assert not any(key[0] == path for key in files._fds)


def test_weight_read_buffers_hold_any_two_stages_and_a_large_one_once():
    assert weight_read_buffers([0, 0]) == []
    assert weight_read_buffers([0, 10, 10, 0]) == [10, 10]  # equal stages: two of them
    assert weight_read_buffers([10, 6, 6]) == [10, 10]  # three buffers would hold more
    assert weight_read_buffers([100, 8, 10, 8]) == [100, 10, 10]  # a large table: one of it, two of the next
    assert weight_read_buffers([0, 100, 0]) == [100]  # one stage on disk, never held twice
    assert weight_read_buffers([100]) == [100, 100]  # a rank of one stage holds it for two tokens


def test_a_request_takes_a_buffer_of_the_smallest_size_that_holds_it_and_waits_for_one():
    pool = BufferPool([100, 10, 10])
    small, small2 = pool.acquire(8), pool.acquire(10)
    assert (small.numel(), small2.numel()) == (10, 10)
    got = []
    waiting = threading.Thread(target=lambda: got.append(pool.acquire(5)))  # the large buffer is not taken
    waiting.start()
    waiting.join(0.2)
    assert not got and pool.free == 1
    assert pool.acquire(100).numel() == 100  # kept free for the load that needs it
    pool.release(small)
    waiting.join(5)
    assert [b.numel() for b in got] == [10]
    with pytest.raises(AssertionError, match="no buffer of the pool holds 101 bytes"):
        pool.acquire(101)
    pool.timeout = 0.05
    with pytest.raises(TimeoutError, match="no read buffer of 10 bytes came back"):
        pool.acquire(1)
    pool.reclaim()
    assert pool.free == pool.count == 3
