"""Checkpoint layouts: bit-exact round trips, a slow packer written from the specs, hand-made goldens."""

from __future__ import annotations

import pytest
import torch

from compress.quant import formats as F
from compress.quant import int4


def random_qw(out: int, inp: int, group_size: int, symmetric: bool, act_order: bool, seed: int = 0):
    """A quantized weight from real RTN on a random matrix, optionally with a shuffled g_idx."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=g) * 0.05
    if not symmetric:
        w[: out // 2] += 0.3  # all-positive rows give zero points of 0: the v1 corner case
    qw = int4.quantize(w, int4.QuantArgs(4, group_size, symmetric))
    if act_order and group_size != -1:  # one group: every g_idx is the plain one
        perm = torch.randperm(inp, generator=g)
        width = inp if group_size == -1 else group_size
        g_idx = torch.empty(inp, dtype=torch.int32)
        g_idx[perm] = (torch.arange(inp) // width).to(torch.int32)
        qw.g_idx = g_idx
    return w, qw


def assert_same(a: int4.QuantizedWeight, b: int4.QuantizedWeight) -> None:
    assert torch.equal(a.codes, b.codes)
    assert torch.equal(a.scales, b.scales)
    assert torch.equal(a.zeros.int(), b.zeros.int())
    assert (a.bits, a.group_size, a.symmetric) == (b.bits, b.group_size, b.symmetric)
    assert torch.equal(a.group_index(), b.group_index())
    # Bit for bit the weights that were evaluated.
    assert torch.equal(a.dequantize(), b.dequantize())


# --- slow packers, transcribed from the published layouts -------------------------------------


def slow_pack_words(values: list[int], bits: int) -> list[int]:
    """Eight 4-bit values per word, value k at bits 4k, last word zero-padded; signed int32 words."""
    per = 32 // bits
    words = []
    for start in range(0, len(values), per):
        word = 0
        for k, v in enumerate(values[start : start + per]):
            assert 0 <= v < 2**bits
            word |= v << (bits * k)
        words.append(word - 2**32 if word >= 2**31 else word)
    return words


def slow_gptq(qw: int4.QuantizedWeight, v1: bool) -> dict[str, torch.Tensor]:
    out, inp = qw.shape
    codes = qw.codes.tolist()
    qweight = [slow_pack_words([codes[o][i] for i in range(inp)], 4) for o in range(out)]  # per output column
    zeros = qw.zeros.tolist()
    groups = qw.scales.shape[1]
    qzeros = [slow_pack_words([zeros[o][g] - (1 if v1 else 0) for o in range(out)], 4) for g in range(groups)]
    return {
        "qweight": torch.tensor(qweight, dtype=torch.int32).t(),
        "qzeros": torch.tensor(qzeros, dtype=torch.int32),
        "scales": qw.scales.t().half(),
        "g_idx": qw.group_index().int(),
    }


def slow_ct(qw: int4.QuantizedWeight) -> dict[str, torch.Tensor]:
    out, inp = qw.shape
    codes = qw.codes.tolist()
    # spec: signed code q_s = q - 8, stored as q_s + 8
    packed = [slow_pack_words([(codes[o][i] - 8) + 8 for i in range(inp)], 4) for o in range(out)]
    result = {
        "weight_packed": torch.tensor(packed, dtype=torch.int32),
        "weight_scale": qw.scales.clone(),
        "weight_shape": torch.tensor([out, inp]),
    }
    if not qw.symmetric:
        zeros = qw.zeros.tolist()
        per_group = [slow_pack_words([zeros[o][g] for o in range(out)], 4) for g in range(qw.scales.shape[1])]
        result["weight_zero_point"] = torch.tensor(per_group, dtype=torch.int32).t()
    return result


# --- round trips -----------------------------------------------------------------------------


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group_size", [-1, 32, 64, 128])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_round_trip_matches_spec(symmetric, group_size, act_order):
    w, qw = random_qw(48, 200, group_size, symmetric, act_order)  # 200: ragged last group for 64 and 128
    fmt = F.gptq_checkpoint_format(qw)
    assert fmt == (F.GPTQ_V1 if symmetric else F.GPTQ_V2)  # asym rows above have zero 0
    tensors = F.gptq_pack(qw, fmt)
    assert tensors["qweight"].shape == (25, 48) and tensors["qweight"].dtype == torch.int32
    assert tensors["qzeros"].shape == (qw.scales.shape[1], 6) and tensors["qzeros"].dtype == torch.int32
    assert tensors["scales"].dtype == torch.float16 and tensors["g_idx"].dtype == torch.int32
    for key, ref in slow_gptq(qw, fmt == F.GPTQ_V1).items():
        assert torch.equal(tensors[key], ref), key
    back = F.gptq_unpack(tensors, 4, group_size, symmetric, fmt)
    assert_same(qw, back)
    assert torch.equal(back.dequantize(), int4.fake_quantize(w, qw.args)) or act_order
    assert (back.g_idx is not None) == (act_order and group_size != -1)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group_size", [-1, 32, 64, 128])
@pytest.mark.parametrize("act_order", [False, True])
def test_compressed_tensors_round_trip_matches_spec(symmetric, group_size, act_order):
    w, qw = random_qw(44, 196, group_size, symmetric, act_order)  # neither dimension a multiple of 8
    tensors = F.ct_pack(qw)
    assert tensors["weight_packed"].shape == (44, 25)
    assert ("weight_zero_point" in tensors) == (not symmetric)
    assert ("weight_g_idx" in tensors) == (act_order and group_size != -1)
    for key, ref in slow_ct(qw).items():
        assert torch.equal(tensors[key], ref), key
    if not symmetric:
        assert tensors["weight_zero_point"].shape == (6, qw.scales.shape[1])
    back = F.ct_unpack(tensors, 4, group_size, symmetric)
    assert_same(qw, back)
    if not act_order:
        assert torch.equal(back.dequantize(), int4.fake_quantize(w, qw.args))


def test_v1_refuses_zero_point_zero():
    _, qw = random_qw(16, 64, 32, symmetric=False, act_order=False)
    assert bool((qw.zeros == 0).any())
    with pytest.raises(F.FormatError, match="gptq_v2"):
        F.gptq_pack(qw, F.GPTQ_V1)


def test_asymmetric_without_zero_zero_uses_v1():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(16, 64, generator=g)  # every group straddles 0: zeros in 1..14
    qw = int4.quantize(w, int4.QuantArgs(4, 32, False))
    assert F.gptq_checkpoint_format(qw) == F.GPTQ_V1
    assert_same(qw, F.gptq_unpack(F.gptq_pack(qw, F.GPTQ_V1), 4, 32, False, F.GPTQ_V1))


def test_gptq_needs_multiples_of_eight():
    _, qw = random_qw(44, 64, 32, True, False)
    with pytest.raises(F.FormatError, match="divisible by 8"):
        F.gptq_pack(qw)


# --- goldens pinned by hand --------------------------------------------------------------------


def hand_qw(symmetric: bool) -> int4.QuantizedWeight:
    """out 8, in 8, one group: row o holds codes (o + k) % 16 for k = 0..7."""
    codes = torch.tensor([[(o + k) % 16 for k in range(8)] for o in range(8)], dtype=torch.uint8)
    zeros = torch.full((8, 1), 8, dtype=torch.int32) if symmetric else torch.arange(8, dtype=torch.int32)[:, None]
    return int4.QuantizedWeight(codes, torch.full((8, 1), 0.5), zeros, 4, -1, symmetric)


def test_gptq_golden():
    t = F.gptq_pack(hand_qw(True), F.GPTQ_V1)
    # column 0: codes 0..7 -> 0x76543210; column 1: 1..8 -> 0x87654321, negative as int32
    assert t["qweight"][0, 0].item() == 0x76543210
    assert t["qweight"][0, 1].item() == 0x87654321 - 2**32
    # symmetric zero 8, stored 7 in every nibble: the 0x77777777 of every symmetric GPTQ checkpoint
    assert t["qzeros"].tolist() == [[0x77777777]]
    assert t["scales"].tolist() == [[0.5] * 8] and t["g_idx"].tolist() == [0] * 8
    t2 = F.gptq_pack(hand_qw(False), F.GPTQ_V2)  # zeros 0..7 stored as they are
    assert t2["qzeros"].tolist() == [[0x76543210]]


def test_compressed_tensors_golden():
    t = F.ct_pack(hand_qw(False))
    assert t["weight_packed"][:, 0].tolist()[:2] == [0x76543210, 0x87654321 - 2**32]
    assert t["weight_zero_point"].tolist() == [[0x76543210]]  # zeros 0..7 along the output dimension
    assert t["weight_shape"].tolist() == [8, 8]
    assert "weight_zero_point" not in F.ct_pack(hand_qw(True))


def test_compressed_tensors_library_unpacks_ours():
    """The library's own unpacker, if installed, reads our packing (signed codes)."""
    helpers = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")
    _, qw = random_qw(44, 196, 64, False, False)
    t = F.ct_pack(qw)
    codes = helpers.unpack_from_int32(t["weight_packed"], 4, torch.Size([44, 196]))
    assert torch.equal(codes.int() + 8, qw.codes.int())
    zp = helpers.unpack_from_int32(t["weight_zero_point"], 4, torch.Size([44, 4]), packed_dim=0)
    assert torch.equal(zp.int() + 8, qw.zeros)
    assert torch.equal(helpers.pack_to_int32((qw.codes.int() - 8).to(torch.int8), 4), t["weight_packed"])
