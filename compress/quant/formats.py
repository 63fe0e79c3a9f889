"""Checkpoint tensor layouts of a :class:`QuantizedWeight`: pure functions, tensors in, tensors out.

Two published layouts, both packing ``bits``-wide unsigned values into int32 words lowest
bits first (value k of a word sits at bits ``k·bits``):

GPTQ (AutoGPTQ / GPTQModel / transformers / vLLM), per linear ``prefix``:

* ``qweight`` int32 ``[in·bits/32, out]``: codes packed along the *input* dimension;
  word ``r`` of column ``o`` holds ``codes[o, r·8 + k]`` at bits ``4k`` (4 bits).
* ``qzeros`` int32 ``[groups, out·bits/32]``: zero points packed along the *output* dimension.
  ``checkpoint_format: gptq`` (v1) stores ``zero − 1`` (loaders add the 1 back);
  ``gptq_v2`` stores ``zero`` itself.
* ``scales`` float16 ``[groups, out]``; ``g_idx`` int32 ``[in]`` (group of each input column).

  Dequantization: ``w[o, i] = (q[o, i] − z[g_idx[i], o]) · s[g_idx[i], o]``.

  **v1 and zero 0.** An asymmetric group whose zero point is 0 stores −1, which no 4-bit
  field holds: the reference packer ORs the 32-bit pattern of −1 into the word and corrupts
  the neighbouring zeros, and a masked field reads back as 15 + 1 = 16. No v1 reader can
  recover it. :func:`gptq_checkpoint_format` therefore picks ``gptq`` (v1, read by every
  loader) when every zero is ≥ 1, which is always so for symmetric weights (zero 8), and
  ``gptq_v2`` (lossless; read by GPTQModel, and by transformers through it) otherwise.
  Nothing is clamped: what is written dequantizes bit for bit to what was evaluated.

compressed-tensors ``pack-quantized`` (llm-compressor / vLLM), per linear ``prefix``:

* ``weight_packed`` int32 ``[out, ceil(in·bits/32)]``: signed codes ``q − 2^(bits−1)``
  stored with the offset ``+2^(bits−1)`` added back, i.e. our unsigned codes, packed along
  the *input* dimension; the last word is zero-padded.
* ``weight_scale`` ``[out, groups]`` (float; we store float32 for float32 models, so
  decompression is exact, float16 otherwise).
* ``weight_zero_point`` (asymmetric only) int32 ``[ceil(out·bits/32), groups]``: signed zero
  ``z − 2^(bits−1)`` offset back to ``z``, packed along the *output* dimension.
  Symmetric weights store no zero point: it is 0 signed, i.e. ``2^(bits−1)`` unsigned.
* ``weight_shape`` int64 ``[2]`` = ``[out, in]``; ``weight_g_idx`` int32 ``[in]`` only with
  activation ordering that reorders groups (``actorder: group``).

  Dequantization: ``w = (q_signed − zp_signed) · s`` = ``(q − z) · s`` in our convention.
"""

from __future__ import annotations

import torch
from torch import Tensor

from compress.quant.int4 import PACK_BITS, QuantizedWeight, default_g_idx, pack_int32, unpack_int32

GPTQ_V1 = "gptq"
GPTQ_V2 = "gptq_v2"
GPTQ_KEYS = ("qweight", "qzeros", "scales", "g_idx")
CT_KEYS = ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape", "weight_g_idx")


class FormatError(ValueError):
    """Tensors that do not fit the layout (wrong shapes, unsupported bit width)."""


def _per_word(bits: int) -> int:
    if bits not in (2, 4, 8):
        raise FormatError(f"int32 packing supports 2, 4 or 8 bits, not {bits}")
    return PACK_BITS // bits


def _canonical_g_idx(g_idx: Tensor, in_features: int, group_size: int) -> Tensor | None:
    """None when ``g_idx`` is the plain ``i // group`` layout (so round trips compare equal)."""
    g = g_idx.to(torch.int32).cpu()
    if torch.equal(g.long(), default_g_idx(in_features, group_size)):
        return None
    return g


def _pad_to(values: Tensor, dim: int, multiple: int) -> Tensor:
    extra = -values.shape[dim] % multiple
    if not extra:
        return values
    pad_shape = list(values.shape)
    pad_shape[dim] = extra
    return torch.cat([values, values.new_zeros(pad_shape)], dim=dim)


# ---------------------------------------------------------------------------
# GPTQ
# ---------------------------------------------------------------------------


def gptq_checkpoint_format(qw: QuantizedWeight) -> str:
    """``gptq`` (v1) when every zero point survives the v1 ``zero − 1``; else ``gptq_v2``."""
    return GPTQ_V1 if bool((qw.zeros >= 1).all()) else GPTQ_V2


def gptq_pack(qw: QuantizedWeight, checkpoint_format: str = GPTQ_V1) -> dict[str, Tensor]:
    """``qweight``, ``qzeros``, ``scales``, ``g_idx`` of one linear (see the module doc)."""
    per_word = _per_word(qw.bits)
    out_features, in_features = qw.shape
    if in_features % per_word or out_features % per_word:
        raise FormatError(
            f"GPTQ packing needs both dimensions divisible by {per_word}, got [out {out_features}, in {in_features}]"
        )
    zeros = qw.zeros.to(torch.int64).cpu()
    if checkpoint_format == GPTQ_V1:
        if bool((zeros < 1).any()):
            raise FormatError("a zero point of 0 cannot be stored in the v1 GPTQ layout (zero − 1); use gptq_v2")
        zeros = zeros - 1
    elif checkpoint_format != GPTQ_V2:
        raise FormatError(f"unknown GPTQ checkpoint_format '{checkpoint_format}'")
    return {
        "qweight": pack_int32(qw.codes.cpu().t(), qw.bits, dim=0),
        "qzeros": pack_int32(zeros.t(), qw.bits, dim=1),
        "scales": qw.scales.cpu().t().to(torch.float16).contiguous(),
        "g_idx": qw.group_index().to(torch.int32).cpu().contiguous(),
    }


def gptq_unpack(
    tensors: dict[str, Tensor],
    bits: int,
    group_size: int,
    symmetric: bool,
    checkpoint_format: str = GPTQ_V1,
) -> QuantizedWeight:
    """Inverse of :func:`gptq_pack`: ``tensors`` holds ``qweight``, ``qzeros``, ``scales`` (``g_idx`` optional)."""
    per_word = _per_word(bits)
    qweight, qzeros, scales = tensors["qweight"], tensors["qzeros"], tensors["scales"]
    in_features = qweight.shape[0] * per_word
    groups, out_features = scales.shape
    if qweight.shape[1] != out_features or tuple(qzeros.shape) != (groups, out_features // per_word):
        raise FormatError(
            f"GPTQ tensors disagree: qweight {list(qweight.shape)}, qzeros {list(qzeros.shape)}, "
            f"scales {list(scales.shape)}"
        )
    codes = unpack_int32(qweight, bits, dim=0).t().contiguous()
    zeros = unpack_int32(qzeros, bits, dim=1).t().to(torch.int32)
    if checkpoint_format == GPTQ_V1:
        zeros = zeros + 1
    elif checkpoint_format != GPTQ_V2:
        raise FormatError(f"unknown GPTQ checkpoint_format '{checkpoint_format}'")
    g_idx = tensors.get("g_idx")
    if g_idx is not None:
        if g_idx.shape != (in_features,):
            raise FormatError(f"g_idx has shape {list(g_idx.shape)}, expected [{in_features}]")
        g_idx = _canonical_g_idx(g_idx, in_features, group_size)
    return QuantizedWeight(
        codes=codes,
        scales=scales.t().float().contiguous(),
        zeros=zeros.contiguous(),
        bits=bits,
        group_size=group_size,
        symmetric=symmetric,
        g_idx=g_idx,
    )


# ---------------------------------------------------------------------------
# compressed-tensors pack-quantized
# ---------------------------------------------------------------------------


def ct_pack(qw: QuantizedWeight, scale_dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
    """``weight_packed``, ``weight_scale``, ``weight_shape`` (+ ``weight_zero_point``, ``weight_g_idx``)."""
    per_word = _per_word(qw.bits)
    mid = 2 ** (qw.bits - 1)
    out_features, in_features = qw.shape
    if qw.symmetric and not bool((qw.zeros == mid).all()):
        raise FormatError(f"a symmetric weight must have every zero point at {mid}")
    scales = qw.scales.cpu()
    if not torch.equal(scales.to(scale_dtype).float(), scales.float()):
        raise FormatError(f"scales are not exactly representable in {scale_dtype}")
    tensors = {
        "weight_packed": pack_int32(_pad_to(qw.codes.cpu(), 1, per_word), qw.bits, dim=1),
        "weight_scale": scales.to(scale_dtype).contiguous(),
        "weight_shape": torch.tensor([out_features, in_features], dtype=torch.int64),
    }
    if not qw.symmetric:
        tensors["weight_zero_point"] = pack_int32(_pad_to(qw.zeros.cpu(), 0, per_word), qw.bits, dim=0)
    if qw.has_act_order_g_idx():
        tensors["weight_g_idx"] = qw.g_idx.to(torch.int32).cpu().contiguous()
    return tensors


def ct_unpack(tensors: dict[str, Tensor], bits: int, group_size: int, symmetric: bool) -> QuantizedWeight:
    """Inverse of :func:`ct_pack`."""
    _per_word(bits)
    out_features, in_features = (int(v) for v in tensors["weight_shape"].tolist())
    packed, scales = tensors["weight_packed"], tensors["weight_scale"]
    if packed.shape[0] != out_features or packed.shape[1] * PACK_BITS < in_features * bits:
        raise FormatError(
            f"weight_packed {list(packed.shape)} does not hold weight_shape [{out_features}, {in_features}]"
        )
    if scales.dim() == 1:  # one scale per row may be stored without the group axis
        scales = scales.unsqueeze(1)
    groups = scales.shape[1]
    codes = unpack_int32(packed, bits, dim=1, size=in_features)
    if symmetric:
        zeros = torch.full((out_features, groups), 2 ** (bits - 1), dtype=torch.int32)
    else:
        zp = tensors.get("weight_zero_point")
        if zp is None:
            raise FormatError("asymmetric weight without weight_zero_point")
        zeros = unpack_int32(zp, bits, dim=0, size=out_features).to(torch.int32)
        if zeros.shape != (out_features, groups):
            raise FormatError(f"weight_zero_point unpacks to {list(zeros.shape)}, expected [{out_features}, {groups}]")
    g_idx = tensors.get("weight_g_idx")
    if g_idx is not None:
        g_idx = _canonical_g_idx(g_idx, in_features, group_size)
    return QuantizedWeight(
        codes=codes,
        scales=scales.float().contiguous(),
        zeros=zeros.contiguous(),
        bits=bits,
        group_size=group_size,
        symmetric=symmetric,
        g_idx=g_idx,
    )


def split_prefix(name: str, keys: tuple[str, ...]) -> tuple[str, str] | None:
    """``('model.layers.0.q_proj', 'qweight')`` for ``'model.layers.0.q_proj.qweight'``, else None."""
    prefix, _, leaf = name.rpartition(".")
    return (prefix, leaf) if leaf in keys and prefix else None
