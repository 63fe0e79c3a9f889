"""The one place for integer weight quantization math.

Convention (the GPTQ one, shared by every algorithm, export and the runtime):

    w ≈ (q - z) · s        q ∈ [0, 2^bits - 1] unsigned codes, z an integer zero point

* symmetric:  s = 2·max|w| / (2^bits - 1),  z = 2^(bits-1)        (8 for 4 bits)
* asymmetric: s = (max(w,0) - min(w,0)) / (2^bits - 1),  z = round(-min/s)

Scales are rounded to float16 *before* codes are computed, because the checkpoint
formats store float16 scales: dequantizing what export wrote then gives bit for bit
the weights that were evaluated.

Groups run along the input dimension. A group size that does not divide the input
width gives a ragged last group (ceil(in / group) groups), as the GPTQ format allows.
``g_idx[i]`` is the group of input column ``i``; without act-order it is ``i // group``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

PACK_BITS = 32


@dataclass(frozen=True)
class QuantArgs:
    bits: int = 4
    group_size: int = 128  # -1: one group per output row
    symmetric: bool = True

    @property
    def maxq(self) -> int:
        return 2**self.bits - 1

    def group_width(self, in_features: int) -> int:
        return in_features if self.group_size == -1 else self.group_size

    def num_groups(self, in_features: int) -> int:
        return -(-in_features // self.group_width(in_features))


@dataclass
class QuantizedWeight:
    """One quantized linear weight: every algorithm produces it, export packs it."""

    codes: Tensor  # uint8 [out, in], values in [0, 2^bits - 1]
    scales: Tensor  # float32 [out, groups], exactly representable in float16
    zeros: Tensor  # int32 [out, groups], integer zero points
    bits: int
    group_size: int
    symmetric: bool
    g_idx: Tensor | None = None  # int32 [in]; None means column i is in group i // group

    @property
    def shape(self) -> tuple[int, int]:
        return (self.codes.shape[0], self.codes.shape[1])

    @property
    def args(self) -> QuantArgs:
        return QuantArgs(self.bits, self.group_size, self.symmetric)

    def to(self, device: torch.device | str) -> QuantizedWeight:
        """This record with its tensors on ``device`` (itself when they are there already)."""
        device = torch.device(device)
        if self.scales.device == device:
            return self
        g_idx = None if self.g_idx is None else self.g_idx.to(device)
        return type(self)(self.codes.to(device), self.scales.to(device), self.zeros.to(device), self.bits,
                          self.group_size, self.symmetric, g_idx)

    def group_index(self) -> Tensor:
        if self.g_idx is not None:
            return self.g_idx.long()
        return default_g_idx(self.shape[1], self.group_size)

    def has_act_order_g_idx(self) -> bool:
        """True when g_idx differs from the plain i // group layout."""
        if self.g_idx is None:
            return False
        return not torch.equal(self.g_idx.long(), default_g_idx(self.shape[1], self.group_size))

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        return dequantize(self.codes, self.scales, self.zeros, self.group_index()).to(dtype)

    def nbytes_packed(self) -> int:
        """Bytes of codes at `bits` per weight plus float16 scales and packed zeros."""
        out, inp = self.shape
        groups = self.scales.shape[1]
        return out * inp * self.bits // 8 + groups * out * 2 + groups * out * self.bits // 8


def default_g_idx(in_features: int, group_size: int) -> Tensor:
    width = in_features if group_size == -1 else group_size
    return torch.arange(in_features, dtype=torch.long) // width


def check_args(args: QuantArgs) -> None:
    if not 2 <= args.bits <= 8:
        raise ValueError(f"bits must be between 2 and 8, got {args.bits}")
    if args.group_size != -1 and args.group_size < 1:
        raise ValueError(f"group_size must be -1 or positive, got {args.group_size}")


def compute_qparams(w: Tensor, args: QuantArgs, shrink: float | Tensor = 1.0) -> tuple[Tensor, Tensor]:
    """Scale and integer zero for each row of ``w`` [rows, k] (one group per row).

    ``shrink`` < 1 clips the range (used by MSE / AWQ clip searches); it may be a
    per-row tensor. Returns float32 scales (float16-representable) and int32 zeros.
    """
    w = w.float()
    maxq = args.maxq
    wmin = torch.clamp(w.amin(dim=1), max=0.0)
    wmax = torch.clamp(w.amax(dim=1), min=0.0)
    if isinstance(shrink, Tensor) or shrink != 1.0:
        wmin = wmin * shrink
        wmax = wmax * shrink
    if args.symmetric:
        amax = torch.maximum(-wmin, wmax)
        scale = 2.0 * amax / maxq
        zero = torch.full_like(scale, (maxq + 1) // 2)
    else:
        scale = (wmax - wmin) / maxq
    # A row of zeros would give scale 0: any scale reproduces it, pick 1.
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    scale = _fp16_representable(scale)
    if not args.symmetric:
        zero = torch.clamp(torch.round(-wmin / scale), 0, maxq)
    return scale, zero.to(torch.int32)


def _fp16_representable(scale: Tensor) -> Tensor:
    """Round to float16, keeping the value inside float16's positive normal range."""
    finfo = torch.finfo(torch.float16)
    return scale.clamp(min=finfo.tiny, max=finfo.max).half().float()


def quantize_codes(w: Tensor, scale: Tensor, zero: Tensor, maxq: int) -> Tensor:
    """Codes for ``w`` [rows, k] (or [rows]) given per-row ``scale`` and ``zero`` [rows]."""
    if w.dim() == 2:
        scale, zero = scale.unsqueeze(1), zero.unsqueeze(1)
    return torch.clamp(torch.round(w.float() / scale) + zero, 0, maxq).to(torch.uint8)


def dequantize_codes(codes: Tensor, scale: Tensor, zero: Tensor) -> Tensor:
    if codes.dim() == 2:
        scale, zero = scale.unsqueeze(1), zero.unsqueeze(1)
    return (codes.float() - zero.float()) * scale


def fake_quantize_rows(w: Tensor, scale: Tensor, zero: Tensor, maxq: int) -> Tensor:
    """Quantize then dequantize with per-row params: the weight the model will see."""
    return dequantize_codes(quantize_codes(w, scale, zero, maxq), scale, zero)


def dequantize(codes: Tensor, scales: Tensor, zeros: Tensor, g_idx: Tensor) -> Tensor:
    """Float32 weight [out, in] from codes, per-group params [out, groups] and g_idx [in]."""
    g = g_idx.long().to(codes.device)
    return (codes.float() - zeros[:, g].float()) * scales[:, g]


def quantize(w: Tensor, args: QuantArgs, qparams: Callable[[Tensor, QuantArgs], tuple[Tensor, Tensor]] | None = None
             ) -> QuantizedWeight:
    """Round-to-nearest quantization of a weight [out, in] per contiguous group.

    ``qparams`` chooses each group's (scale, zero) from its columns; default :func:`compute_qparams`
    (GPTQ's RTN passes its clip search).
    """
    check_args(args)
    qparams = qparams or compute_qparams
    out_features, in_features = w.shape
    width = args.group_width(in_features)
    groups = args.num_groups(in_features)
    codes = torch.empty(out_features, in_features, dtype=torch.uint8, device=w.device)
    scales = torch.empty(out_features, groups, dtype=torch.float32, device=w.device)
    zeros = torch.empty(out_features, groups, dtype=torch.int32, device=w.device)
    for g in range(groups):
        cols = slice(g * width, min((g + 1) * width, in_features))
        scale, zero = qparams(w[:, cols], args)
        codes[:, cols] = quantize_codes(w[:, cols], scale, zero, args.maxq)
        scales[:, g], zeros[:, g] = scale, zero
    return QuantizedWeight(codes, scales, zeros, args.bits, args.group_size, args.symmetric)


def fake_quantize(w: Tensor, args: QuantArgs) -> Tensor:
    """RTN quantize-dequantize, in ``w``'s dtype."""
    return quantize(w, args).dequantize(w.dtype)


# ---------------------------------------------------------------------------
# Packing: `bits`-wide values into int32 words, lowest bits first (the order of
# the GPTQ and compressed-tensors formats: value k of a word sits at bits k·b).
# ---------------------------------------------------------------------------


def pack_int32(values: Tensor, bits: int, dim: int) -> Tensor:
    """Pack unsigned ``values`` (< 2^bits) along ``dim`` into int32 words.

    The size of ``dim`` must be a multiple of 32 / bits (bits in 2, 4, 8).
    """
    if PACK_BITS % bits:
        raise ValueError(f"cannot pack {bits}-bit values into int32 words")
    per_word = PACK_BITS // bits
    v = values.movedim(dim, -1).to(torch.int64)
    n = v.shape[-1]
    if n % per_word:
        raise ValueError(f"dimension of size {n} is not a multiple of {per_word} for {bits}-bit packing")
    v = v.reshape(*v.shape[:-1], n // per_word, per_word)
    shifts = torch.arange(per_word, dtype=torch.int64, device=v.device) * bits
    words = (v << shifts).sum(dim=-1)
    # Reinterpret the unsigned 32-bit pattern as int32.
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    return words.movedim(-1, dim).contiguous()


def unpack_int32(words: Tensor, bits: int, dim: int, size: int | None = None) -> Tensor:
    """Inverse of :func:`pack_int32`; returns uint8 (bits ≤ 8), trimmed to ``size``."""
    per_word = PACK_BITS // bits
    w = words.movedim(dim, -1).to(torch.int64) & 0xFFFFFFFF
    shifts = torch.arange(per_word, dtype=torch.int64, device=w.device) * bits
    v = (w.unsqueeze(-1) >> shifts) & (2**bits - 1)
    v = v.reshape(*w.shape[:-1], w.shape[-1] * per_word)
    if size is not None:
        v = v[..., :size]
    return v.to(torch.uint8).movedim(-1, dim).contiguous()
