"""Disk plumbing: reads and writes land where they should, O_DIRECT or not, and deleted files
leave no descriptor behind."""

from __future__ import annotations

import pytest
import torch

from flexlab.engine.placement import ALIGN
from flexlab.engine.tiers import DiskFiles, aligned_empty, preallocate


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
