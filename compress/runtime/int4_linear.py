"""Int4 linear layers on three back ends, chosen once at load.

* ``cuda``: ``torch.ops.aten._weight_int4pack_mm`` (tensor-core tiles, bfloat16 activations)
* ``cpu``: ``torch.ops.aten._weight_int4pack_mm_for_cpu`` (bfloat16 activations: the float32
  entry point of that kernel is an unvectorized path, ~20x slower)
* ``reference``: dequantize once, then a plain float matmul. The oracle in tests.

Both kernels dequantize as ``w = (q - 8) · s + zero_f`` per group of input columns. Our
convention (compress/quant/int4.py) is ``w = (q - z) · s``, so ``zero_f = (8 - z) · s``: exact
in real arithmetic; the kernels only round ``s`` and ``zero_f`` to the activation dtype.

Shapes the kernels cannot take directly are adapted at load, never per call where avoidable:

* group size: a kernel group (32/64/128/256) must sit inside one of our groups, so a group of
  128 over 576 columns (ragged last group) runs as kernel groups of 64; per-row scales
  (group -1) repeat the scale over every kernel group.
* in_features not a multiple of any usable kernel group: zero-pad the columns (and the input).
* out_features not a multiple of 16 (CPU) / 8 (CUDA): pad rows, slice the output.
* act-order ``g_idx``: sort the columns by group once; the input is gathered by that
  permutation on each call.
* groups no kernel group tiles (16 or 100 columns, uneven act-order groups): each group is
  padded to a multiple of 32 columns through the same input gather (reading a zero column).
* anything else (bit widths other than 4): the reference back end, logged once.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from compress.quant.int4 import QuantizedWeight

log = logging.getLogger(__name__)

KERNEL_GROUPS = (256, 128, 64, 32)
BACKENDS = ("auto", "kernel", "cpu", "cuda", "reference")
_logged: set[str] = set()


def _log_once(message: str) -> None:
    if message not in _logged:
        _logged.add(message)
        log.warning(message)


@dataclass
class KernelLayout:
    """Our quantized weight rearranged for the kernels (device-independent part)."""

    codes: Tensor  # int32 [n_padded, k_padded], values 0..15
    scales_and_zeros: Tensor  # float32 [k_padded / group, n_padded, 2]: s and (8 - z) · s
    group: int  # kernel group size
    perm: Tensor | None  # input column order, None when identity
    in_features: int
    out_features: int
    k_padded: int
    n_padded: int


class UnsupportedLayout(ValueError):
    pass


def kernel_layout(qw: QuantizedWeight, row_multiple: int = 16) -> KernelLayout:
    """Rearrange ``qw`` for the int4 kernels, or raise UnsupportedLayout with the reason.

    ``perm`` (when not None) lists, for each kernel column, the input column it reads;
    the value ``in_features`` stands for a zero column (padding inside a group).
    """
    if qw.bits != 4:
        raise UnsupportedLayout(f"{qw.bits}-bit weights (the kernels take 4 bits)")
    out_features, in_features = qw.shape
    g_col = qw.group_index()
    perm = None
    if qw.has_act_order_g_idx():
        perm = torch.argsort(g_col, stable=True)
        g_col = g_col[perm]
    fit = _pick_kernel_group(g_col)
    if fit is None:
        # Groups that no kernel group tiles (e.g. 100 columns): pad every group to 32 columns
        # through the input gather, reading a zero column for the padding.
        group, perm, g_col = 32, *_pad_groups(g_col, perm, 32)
        k_padded = g_col.numel()
    else:
        group, k_padded = fit
        g_col = torch.cat([g_col, g_col[-1:].expand(k_padded - in_features)])
    g_block = g_col[::group]  # our group for each kernel group
    n_padded = -(-out_features // row_multiple) * row_multiple
    scales = qw.scales.float()[:, g_block]  # [out, blocks]
    zeros = qw.zeros.float()[:, g_block]
    sz = torch.stack([scales, (8.0 - zeros) * scales], dim=-1)  # [out, blocks, 2]
    codes = qw.codes.to(torch.int32).cpu()
    if perm is not None:
        codes = torch.cat([codes, torch.full((out_features, 1), 8, dtype=torch.int32)], dim=1)[:, perm.cpu()]
    padded_codes = torch.full((n_padded, k_padded), 8, dtype=torch.int32)
    padded_codes[:out_features, : codes.shape[1]] = codes
    padded_sz = torch.zeros(n_padded, k_padded // group, 2)
    padded_sz[:out_features] = sz.cpu()
    return KernelLayout(
        codes=padded_codes,
        scales_and_zeros=padded_sz.transpose(0, 1).contiguous(),
        group=group,
        perm=None if perm is None else perm.cpu(),
        in_features=in_features,
        out_features=out_features,
        k_padded=k_padded,
        n_padded=n_padded,
    )


def _pick_kernel_group(g_col: Tensor) -> tuple[int, int] | None:
    """Largest kernel group whose blocks each lie in one of our groups, padding only at the end
    (unpadded preferred); None when none fits."""
    in_features = g_col.numel()
    fits = []
    for group in KERNEL_GROUPS:
        k_padded = -(-in_features // group) * group
        padded = torch.cat([g_col, g_col[-1:].expand(k_padded - in_features)]).view(-1, group)
        if bool((padded == padded[:, :1]).all()):
            fits.append((k_padded != in_features, group, k_padded))
    if not fits:
        return None
    fits.sort(key=lambda f: (f[0], -f[1]))
    return fits[0][1], fits[0][2]


def _pad_groups(g_col: Tensor, perm: Tensor | None, group: int) -> tuple[Tensor, Tensor]:
    """Column index and group of each kernel column when every group is padded to ``group``."""
    in_features = g_col.numel()
    order = perm if perm is not None else torch.arange(in_features)
    index, groups = [], []
    for g in torch.unique_consecutive(g_col).tolist():
        cols = order[g_col == g]
        extra = -cols.numel() % group
        index.append(torch.cat([cols, torch.full((extra,), in_features, dtype=cols.dtype)]))
        groups.append(torch.full((cols.numel() + extra,), g, dtype=torch.long))
    return torch.cat(index), torch.cat(groups)


def pack_for_cuda(codes: Tensor, device: torch.device) -> tuple[Tensor, int]:
    """Codes int32 [n, k] -> the CUDA kernel's tiled int32 layout and its inner k tiles."""
    k = codes.shape[1]
    inner_k_tiles = next(t for t in (8, 4, 2) if k % (t * 16) == 0)
    c = codes.to(device)
    # Since torch 2.5 the CUDA packer takes two codes per byte, even column in the high nibble.
    as_bytes = ((c[:, ::2] << 4) | c[:, 1::2]).to(torch.uint8)
    return torch.ops.aten._convert_weight_to_int4pack(as_bytes, inner_k_tiles), inner_k_tiles


class Int4Linear(nn.Module):
    """``y = x Wᵀ + b`` with W held as int4 codes and per-group scales and zeros."""

    def __init__(self, qw: QuantizedWeight, bias: Tensor | None = None, backend: str = "auto",
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
        super().__init__()
        device = torch.device(device)
        if backend not in BACKENDS:
            raise ValueError(f"unknown int4 back end '{backend}'; use one of {', '.join(BACKENDS)}")
        self.out_features, self.in_features = qw.shape
        self.backend = resolve_backend(backend, device)
        self.register_buffer("bias", None if bias is None else bias.to(device, dtype))
        if self.backend != "reference":
            try:
                self._init_kernel(qw, device)
            except UnsupportedLayout as e:
                if backend in ("cpu", "cuda"):  # named explicitly: the caller wants to know
                    raise
                _log_once(f"int4 kernel cannot take this layer ({e}); using the reference back end")
                self.backend = "reference"
        if self.backend == "reference":
            self.register_buffer("weight", qw.dequantize(torch.float32).to(device, dtype))

    def _init_kernel(self, qw: QuantizedWeight, device: torch.device) -> None:
        layout = kernel_layout(qw, row_multiple=16 if self.backend == "cpu" else 8)
        self.group = layout.group
        # A perm that reads the zero column (index in_features) needs the input padded first.
        self.gather_zero = layout.perm is not None and bool((layout.perm == layout.in_features).any())
        self.k_pad = layout.k_padded - (layout.in_features if layout.perm is None else layout.perm.numel())
        self.n_padded = layout.n_padded
        # bfloat16 on both: the CUDA kernel takes nothing else, the CPU one is fast only in it.
        self.compute_dtype = torch.bfloat16
        self.register_buffer("perm", None if layout.perm is None else layout.perm.to(device))
        self.register_buffer("scales_and_zeros", layout.scales_and_zeros.to(device, self.compute_dtype))
        if self.backend == "cuda":
            packed, self.inner_k_tiles = pack_for_cuda(layout.codes, device)
        else:
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(layout.codes, 2).to(device)
        self.register_buffer("packed", packed)

    def forward(self, x: Tensor) -> Tensor:
        if self.backend == "reference":
            return F.linear(x, self.weight, self.bias)
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if self.perm is not None:
            if self.gather_zero:
                x2 = F.pad(x2, (0, 1))
            x2 = x2.index_select(1, self.perm)
        if self.k_pad:
            x2 = F.pad(x2, (0, self.k_pad))
        x2 = x2.to(self.compute_dtype).contiguous()
        if self.backend == "cuda":
            y = torch.ops.aten._weight_int4pack_mm(x2, self.packed, self.group, self.scales_and_zeros)
        else:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.packed, self.group, self.scales_and_zeros)
        if self.n_padded != self.out_features:
            y = y[:, : self.out_features]
        y = y.to(x.dtype).reshape(*shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias

    def as_function(self, dtype: torch.dtype) -> Callable[[Tensor], Tensor]:
        """``forward`` for 2-D contiguous inputs of ``dtype``, with the per-call work done once.

        On a small model's decode step the Python around the kernel (attribute look-ups, reshapes,
        no-op casts) costs a third of the kernel itself; the closure keeps only the kernel call.
        Layouts needing a gather or padding, and other back ends, return ``forward`` itself.
        The buffers are captured: build it again after moving the module.
        """
        plain = self.backend == "cpu" and self.perm is None and not self.k_pad and self.n_padded == self.out_features
        if not plain:
            return self.forward
        mm, packed, group, sz, bias = _CPU_INT4_MM, self.packed, self.group, self.scales_and_zeros, self.bias
        if dtype == self.compute_dtype and bias is None:
            return lambda x: mm(x.contiguous(), packed, group, sz)  # contiguous: free when it already is
        compute = self.compute_dtype

        def matmul(x: Tensor) -> Tensor:
            y = mm(x.to(compute).contiguous(), packed, group, sz).to(dtype)
            return y if bias is None else y + bias

        return matmul

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, backend={self.backend}"


# The plain function skips the operator-overload dispatch in Python (a few microseconds per call).
_CPU_INT4_MM = getattr(torch, "_weight_int4pack_mm_for_cpu", None) or torch.ops.aten._weight_int4pack_mm_for_cpu


def resolve_backend(backend: str, device: torch.device) -> str:
    """'auto' / 'kernel' -> the kernel for the device; a kernel on the wrong device is an error."""
    if backend in ("auto", "kernel"):
        return "cuda" if device.type == "cuda" else "cpu" if device.type == "cpu" else "reference"
    if backend in ("cpu", "cuda") and backend != device.type:
        raise ValueError(f"int4 back end '{backend}' cannot run on device '{device}'")
    return backend


def concat_quantized(parts: list[QuantizedWeight]) -> QuantizedWeight | None:
    """Stack weights sharing an input along the output dimension (fused q/k/v, gate/up).

    None when their group layouts differ (then each stays its own linear).
    """
    first = parts[0]
    for p in parts[1:]:
        if (p.bits, p.group_size, p.symmetric, p.shape[1]) != (first.bits, first.group_size, first.symmetric,
                                                              first.shape[1]):
            return None
        if p.scales.shape[1] != first.scales.shape[1] or not torch.equal(p.group_index(), first.group_index()):
            return None
    return QuantizedWeight(
        codes=torch.cat([p.codes for p in parts]),
        scales=torch.cat([p.scales for p in parts]),
        zeros=torch.cat([p.zeros for p in parts]),
        bits=first.bits,
        group_size=first.group_size,
        symmetric=first.symmetric,
        g_idx=first.g_idx,
    )
