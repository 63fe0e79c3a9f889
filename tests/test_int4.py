"""The shared integer math: ranges, groups, error bounds, packing, against slow references."""

from __future__ import annotations

import itertools

import pytest
import torch

from compress.quant import int4
from compress.quant.int4 import QuantArgs


def slow_rtn(w: torch.Tensor, args: QuantArgs) -> torch.Tensor:
    """Element by element, straight from the definition in int4's docstring."""
    out = torch.empty_like(w, dtype=torch.float32)
    width = w.shape[1] if args.group_size == -1 else args.group_size
    maxq = 2**args.bits - 1
    for r in range(w.shape[0]):
        for start in range(0, w.shape[1], width):
            g = [float(v) for v in w[r, start : start + width]]
            lo, hi = min(min(g), 0.0), max(max(g), 0.0)
            if args.symmetric:
                amax = max(-lo, hi)
                s = 2 * amax / maxq
                s = s if s > 0 else 1.0
                s = float(torch.tensor(s).half())
                z = (maxq + 1) // 2
            else:
                s = (hi - lo) / maxq
                s = s if s > 0 else 1.0
                s = float(torch.tensor(s).half())
                z = min(max(round(-lo / s), 0), maxq)
            for j, v in enumerate(g):
                q = min(max(round(v / s) + z, 0), maxq)
                out[r, start + j] = (q - z) * s
    return out


ALL_ARGS = [QuantArgs(b, g, s) for b, g, s in itertools.product([2, 3, 4, 8], [-1, 8, 16], [True, False])]


@pytest.mark.parametrize("args", ALL_ARGS, ids=str)
def test_rtn_matches_slow_reference(args):
    torch.manual_seed(0)
    w = torch.randn(5, 40) * torch.rand(5, 1) * 3
    got = int4.fake_quantize(w, args)
    torch.testing.assert_close(got, slow_rtn(w, args), rtol=0, atol=1e-6)


@pytest.mark.parametrize("bits,symmetric", list(itertools.product([2, 4, 8], [True, False])))
@pytest.mark.parametrize("group_size", [-1, 32, 64, 128])
def test_codes_in_range_and_error_bounded(bits, symmetric, group_size):
    torch.manual_seed(1)
    w = torch.randn(16, 200)  # 200 is ragged for 64 and 128
    args = QuantArgs(bits, group_size, symmetric)
    qw = int4.quantize(w, args)
    groups = args.num_groups(200)
    assert qw.scales.shape == (16, groups) and qw.zeros.shape == (16, groups)
    assert int(qw.codes.max()) <= 2**bits - 1
    assert int(qw.zeros.min()) >= 0 and int(qw.zeros.max()) <= 2**bits - 1
    # Scales survive a float16 round trip unchanged (export stores float16).
    assert torch.equal(qw.scales, qw.scales.half().float())
    err = (qw.dequantize() - w).abs()
    scale_per_col = qw.scales[:, qw.group_index()]
    # Round to nearest: within half a step, plus at most one step of range clipping.
    assert bool((err <= scale_per_col * 1.0 + 1e-6).all())
    assert float((err <= scale_per_col * 0.5 + 1e-6).float().mean()) > 0.97


def test_ragged_last_group():
    args = QuantArgs(4, 128, True)
    w = torch.randn(3, 576)
    qw = int4.quantize(w, args)
    assert qw.scales.shape[1] == 5  # 576 = 4.5 × 128
    assert torch.equal(qw.group_index(), torch.arange(576) // 128)
    # The last, half-width group has its own range.
    w2 = w.clone()
    w2[:, 512:] *= 100
    qw2 = int4.quantize(w2, args)
    torch.testing.assert_close(qw2.scales[:, :4], qw.scales[:, :4])


def test_values_on_the_grid_are_exact():
    torch.manual_seed(2)
    scale = torch.tensor([0.5, 0.25]).unsqueeze(1)
    codes = torch.randint(0, 16, (2, 32)).float()
    codes[:, 0], codes[:, 1] = 0, 15  # span the whole range
    w = (codes - 8) * scale
    got = int4.fake_quantize(w, QuantArgs(4, -1, False))
    torch.testing.assert_close(got, w, rtol=0, atol=0)


def test_zero_rows_and_symmetric_zero_point():
    w = torch.zeros(2, 16)
    qw = int4.quantize(w, QuantArgs(4, 8, True))
    assert torch.equal(qw.dequantize(), w)
    assert bool((qw.zeros == 8).all())
    assert bool(torch.isfinite(qw.scales).all())


def test_bad_args():
    with pytest.raises(ValueError, match="bits"):
        int4.quantize(torch.randn(2, 8), QuantArgs(9, 8, True))
    with pytest.raises(ValueError, match="group_size"):
        int4.quantize(torch.randn(2, 8), QuantArgs(4, 0, True))


def test_pack_golden_layout():
    # Lowest bits first: values 1..8 along the packed dimension → 0x87654321.
    v = torch.arange(1, 9, dtype=torch.uint8).view(1, 8)
    assert int(int4.pack_int32(v, 4, dim=1)) == 0x87654321 - 2**32  # as signed int32
    # Along dim 0 each column packs separately.
    words = int4.pack_int32(v.T.repeat(1, 2), 4, dim=0)
    assert words.shape == (1, 2) and bool((words == 0x87654321 - 2**32).all())
    # 8-bit: four bytes little end first.
    b = torch.tensor([[0x11, 0x22, 0x33, 0x44]], dtype=torch.uint8)
    assert int(int4.pack_int32(b, 8, dim=1)) == 0x44332211
    # 2-bit: sixteen values.
    two = torch.tensor([[3] + [0] * 15], dtype=torch.uint8)
    assert int(int4.pack_int32(two, 2, dim=1)) == 3


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("dim", [0, 1])
def test_pack_unpack_round_trip(bits, dim):
    torch.manual_seed(3)
    shape = (64, 48) if dim == 0 else (24, 64)
    v = torch.randint(0, 2**bits, shape, dtype=torch.uint8)
    words = int4.pack_int32(v, bits, dim)
    assert words.dtype == torch.int32
    assert words.shape[dim] == shape[dim] * bits // 32
    assert torch.equal(int4.unpack_int32(words, bits, dim), v)


def test_pack_rejects_bad_sizes():
    with pytest.raises(ValueError, match="multiple"):
        int4.pack_int32(torch.zeros(1, 12, dtype=torch.uint8), 4, dim=1)
    with pytest.raises(ValueError, match="cannot pack"):
        int4.pack_int32(torch.zeros(1, 32, dtype=torch.uint8), 3, dim=1)


def test_dequantize_with_permuted_g_idx():
    torch.manual_seed(4)
    w = torch.randn(4, 32)
    qw = int4.quantize(w, QuantArgs(4, 8, True))
    perm = torch.randperm(32)
    # Permuting columns together with their group index gives the permuted weight.
    moved = int4.dequantize(qw.codes[:, perm], qw.scales, qw.zeros, qw.group_index()[perm])
    torch.testing.assert_close(moved, qw.dequantize()[:, perm], rtol=0, atol=0)


def test_record_to_device_keeps_its_kind():
    from compress.quant.gptq import PackedCodesWeight

    g = torch.Generator().manual_seed(0)
    qw = int4.quantize(torch.randn(8, 40, generator=g), QuantArgs(4, 16, False))
    assert qw.to("cpu") is qw  # already there: no copy
    packed = PackedCodesWeight.of(qw)
    assert packed.to("cpu") is packed
    moved = qw.to("meta")
    assert type(moved) is type(qw) and moved.codes.device.type == "meta"
    assert moved.shape == qw.shape and (moved.bits, moved.group_size, moved.symmetric) == (4, 16, False)
