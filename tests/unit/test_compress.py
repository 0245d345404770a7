"""Quantization: bit packing, the round-trip bound, edge cases, sizes — property-based where it can be."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flexlab.compress import CacheQuantConfig, QuantConfig, QuantError, dequantize, pack_bits, quantize, unpack_bits
from flexlab.compress.packing import unit
from flexlab.compress.quant import quantize_workspace

BITS = [2, 3, 4, 8]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@settings(max_examples=60, deadline=None)
@given(bits=st.sampled_from(BITS), units=st.integers(1, 20), rows=st.integers(1, 4), seed=st.integers(0, 2**16))
def test_pack_unpack_round_trip_and_size(bits, units, rows, seed):
    per_unit, bytes_per_unit = unit(bits)
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, (rows, units * per_unit), generator=g, dtype=torch.uint8)
    packed = pack_bits(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (rows, units * bytes_per_unit)
    assert torch.equal(unpack_bits(packed, bits), codes)


def test_three_bit_codes_really_take_three_bits():
    codes = torch.full((8,), 7, dtype=torch.uint8)
    assert pack_bits(codes, 3).tolist() == [255, 255, 255]  # 24 ones: no spare bit per code
    codes = torch.tensor([1, 0, 0, 0, 0, 0, 0, 0], dtype=torch.uint8)
    assert pack_bits(codes, 3).tolist() == [1, 0, 0]


@settings(max_examples=80, deadline=None)
@given(
    bits=st.sampled_from(BITS),
    group_size=st.sampled_from([1, 3, 8, 32, 64, 128]),
    shape=st.lists(st.integers(1, 40), min_size=1, max_size=3),
    dim=st.integers(-3, 2),
    dtype=st.sampled_from(DTYPES),
    symmetric=st.booleans(),
    scale=st.sampled_from([1e-3, 1.0, 300.0]),
    seed=st.integers(0, 2**16),
)
def test_round_trip_within_half_a_step(bits, group_size, shape, dim, dtype, symmetric, scale, seed):
    dim = dim % len(shape)
    x = (torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * scale).to(dtype)
    cfg = QuantConfig(bits=bits, group_size=group_size, group_dim=dim, symmetric=symmetric)
    q = quantize(x, cfg)
    back = dequantize(q, torch.float32)
    assert back.shape == x.shape and dequantize(q).dtype == dtype
    err = (back - x.float()).abs()
    assert (err <= q.max_error() * (1 + 1e-5) + 1e-6 * x.float().abs()).all()
    # The bound is tight enough to mean something: a step is at most the group's range / (levels - 1),
    # widened only by rounding the scale outward to float16.
    span = x.float().abs().max() * 2
    assert float(q.max_error().max()) <= float(span) / (cfg.levels - 1) * 0.5 * 1.01 + 1e-4


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_constant_groups_and_zeros_are_exact(bits, dtype):
    x = torch.zeros(4, 64, dtype=dtype)
    x[1] = 0.5
    x[2] = -3.0
    x[3, :32] = 7.0  # a constant group next to a zero group
    q = quantize(x, QuantConfig(bits=bits, group_size=32))
    assert torch.isfinite(q.scale).all()
    assert torch.equal(dequantize(q), x)  # the zero point is the constant itself
    # Symmetric grids hold 0 exactly; a nonzero constant lands within half a step.
    q = quantize(x, QuantConfig(bits=bits, group_size=32, symmetric=True))
    back = dequantize(q, torch.float32)
    assert torch.isfinite(back).all() and torch.equal(back[0], x[0].float())
    assert ((back - x.float()).abs() <= q.max_error() * (1 + 1e-5)).all()


@pytest.mark.parametrize(
    "bits, group, symmetric, expected",
    [
        (4, 64, False, 4.5),
        (3, 64, False, 3.5),
        (2, 32, False, 3.0),
        (8, 128, False, 8.25),
        (4, 64, True, 4.25),
    ],
)
def test_nbytes_are_what_the_bits_imply(bits, group, symmetric, expected):
    cfg = QuantConfig(bits=bits, group_size=group, symmetric=symmetric)
    q = quantize(torch.randn(64, 256), cfg)
    assert q.bits_per_element == expected == cfg.bits_per_element()


def test_padding_when_the_dim_is_not_a_multiple_of_the_group():
    x = torch.arange(10, dtype=torch.float32).reshape(2, 5) * 10  # rows 0..40 and 50..90
    q = quantize(x, QuantConfig(bits=8, group_size=4))
    assert q.scale.shape == (2, 2)  # 5 columns -> two groups, the second padded with its last element
    # The padded group [40, 40, 40, 40] is constant, so its element is exact.
    assert dequantize(q)[0, 4] == 40
    assert (dequantize(q) - x).abs().max() <= 0.5 * 30 / 255 + 1e-5


def test_bad_input_gets_clear_errors():
    with pytest.raises(QuantError, match="bits=5 is invalid"):
        QuantConfig(bits=5)
    with pytest.raises(QuantError, match="group_size=0"):
        QuantConfig(group_size=0)
    with pytest.raises(QuantError, match="kv_layout='per-head'"):
        CacheQuantConfig(kv_layout="per-head")
    with pytest.raises(QuantError, match="window=-1"):
        CacheQuantConfig(window=-1)
    with pytest.raises(QuantError, match="group_dim=2 is out of range"):
        quantize(torch.randn(3, 4), QuantConfig(group_dim=2))
    with pytest.raises(QuantError, match="NaN or inf"):
        quantize(torch.tensor([1.0, float("nan")]), QuantConfig())
    with pytest.raises(QuantError, match="floating-point"):
        quantize(torch.arange(4), QuantConfig())
    with pytest.raises(QuantError, match="overflow the scale dtype"):
        quantize(torch.tensor([-1e6, 1e6]), QuantConfig(group_size=2))
    q = quantize(torch.tensor([-1e6, 1e6]), QuantConfig(group_size=2, scale_dtype=torch.float32))
    assert (dequantize(q) - torch.tensor([-1e6, 1e6])).abs().max() <= q.max_error().max()


def test_qtensor_moves_and_rebuilds():
    q = quantize(torch.randn(8, 64), QuantConfig(bits=3, group_size=16))
    moved = q.with_tensors([t.clone() for t in q.tensors()])
    assert torch.equal(dequantize(moved), dequantize(q))
    assert q.to("cpu").nbytes == q.nbytes


@settings(max_examples=40, deadline=None)
@given(
    bits=st.sampled_from(BITS),
    group_size=st.sampled_from([1, 5, 32, 64]),
    symmetric=st.booleans(),
    shape=st.lists(st.integers(1, 30), min_size=1, max_size=3),
    dim=st.integers(-3, 2),
)
def test_predicted_nbytes_equal_the_stored_bytes(bits, group_size, symmetric, shape, dim):
    cfg = QuantConfig(bits=bits, group_size=group_size, symmetric=symmetric, group_dim=dim % len(shape))
    assert cfg.nbytes(tuple(shape)) == quantize(torch.randn(shape), cfg).nbytes


@settings(max_examples=30, deadline=None)
@given(
    bits=st.sampled_from(BITS),
    group_size=st.sampled_from([1, 5, 32]),
    symmetric=st.booleans(),
    shape=st.lists(st.integers(1, 12), min_size=1, max_size=3),
    dim=st.integers(0, 2),
    chunk=st.integers(1, 200),
)
def test_slices_of_a_large_tensor_quantize_as_the_whole(bits, group_size, symmetric, shape, dim, chunk):
    """A large tensor is quantized a slice of rows at a time (its temporaries that small): the same
    codes, scales and zero points as at once, for every shape, grouping dimension and slice size."""
    import flexlab.compress.quant as quant

    cfg = QuantConfig(bits=bits, group_size=group_size, symmetric=symmetric, group_dim=dim % len(shape))
    x = torch.randn(shape, generator=torch.Generator().manual_seed(chunk)).to(torch.bfloat16)
    whole = quantize(x, cfg)
    with pytest.MonkeyPatch.context() as m:  # a fresh patch per example
        m.setattr(quant, "CHUNK_ELEMENTS", chunk)
        sliced = quantize(x, cfg)
        workspace = quant.quantize_workspace(tuple(shape), cfg)
    assert all(torch.equal(a, b) for a, b in zip(whole.tensors(), sliced.tensors()))
    assert (sliced.shape, sliced.dtype) == (whole.shape, whole.dtype)
    row = torch.Size(shape[1:]).numel()
    sliced_rows = len(shape) > 1 and cfg.group_dim != 0
    assert workspace == 9 * (min(shape[0], max(1, chunk // row)) * row if sliced_rows else x.numel())


def test_quantizing_a_token_table_needs_a_slice_of_temporaries():
    cfg = QuantConfig(bits=4, group_size=64)
    assert quantize_workspace((128256, 4096), cfg) == 9 * (4 << 20)  # Llama-3's table: 36 MiB, not 4.7 GiB
    assert quantize_workspace((128256, 4096), cfg.replace(group_dim=0)) == 9 * 128256 * 4096  # groups across rows


@pytest.mark.parametrize("symmetric", [False, True])
def test_quantize_leaves_its_input_alone(symmetric):
    x = torch.randn(16, 64)  # float32 in group order: the grouped view shares x's memory
    before = x.clone()
    quantize(x, QuantConfig(bits=4, group_size=64, symmetric=symmetric))
    assert torch.equal(x, before)


@pytest.mark.parametrize("layout", ["per-token", "per-channel"])
@pytest.mark.parametrize("bits,group_size,symmetric", [(2, 8, False), (4, 16, True), (8, 5, False)])
def test_kv_rows_are_the_bytes_the_codec_announces(layout, bits, group_size, symmetric):
    """The codec sizes a row from the shape alone (no quantizing); encode must fill exactly that."""
    from flexlab.engine.kvcodec import KVCodec

    cfg = CacheQuantConfig(bits=bits, group_size=group_size, symmetric=symmetric, kv_layout=layout)
    codec = KVCodec(cfg, 3, 8, torch.bfloat16, keys=True)
    x = torch.randn(2, 4 * codec.chunk, 3, 8, dtype=torch.bfloat16)
    rows = codec.encode(x)
    assert rows.shape == (2, 4, codec.row_bytes)
    back = codec.decode(rows)
    assert back.shape == x.shape and back.dtype == torch.bfloat16  # the compute dtype by default
    wide = codec.decode(rows, torch.float32)  # or as asked (the host's float32): the same values, finer
    assert wide.dtype == torch.float32 and torch.allclose(wide, back.float(), atol=2e-2, rtol=1e-2)
