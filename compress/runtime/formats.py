"""Read int4 linears of an exported checkpoint back into QuantizedWeight records.

Layouts (docs/DESIGN.md, the same ones export writes):

* GPTQ (``quant_method: gptq``): ``qweight`` int32 [in/8, out] packed along the input,
  ``qzeros`` int32 [groups, out/8] packed along the output, holding zero − 1 for
  ``checkpoint_format: gptq`` (v1) and the zero itself for ``gptq_v2``; ``scales`` fp16
  [groups, out]; ``g_idx`` int32 [in] (optional).
* compressed-tensors ``pack-quantized``: ``weight_packed`` int32 [out, in/8] packed along the
  input with values offset by +8 (so the stored nibble is our unsigned code),
  ``weight_scale`` [out, groups], optional ``weight_zero_point`` [out, groups] (signed, so
  our zero is it + 8), ``weight_shape`` [2].
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from compress.quant.int4 import QuantizedWeight, unpack_int32
from compress.runtime.errors import RuntimeInputError


def read_quantized(tensors: Mapping[str, Tensor], config: dict) -> tuple[str, dict[str, QuantizedWeight]]:
    """(format name, {module name: record}) for every int4 linear in ``tensors``."""
    qconfig = config.get("quantization_config") or config.get("compression_config") or {}
    method = qconfig.get("quant_method", "")
    gptq = [k[: -len(".qweight")] for k in tensors if k.endswith(".qweight")]
    packed = [k[: -len(".weight_packed")] for k in tensors if k.endswith(".weight_packed")]
    if gptq:
        return "gptq", {p: read_gptq(tensors, p, qconfig) for p in gptq}
    if packed:
        return "compressed-tensors", {p: read_compressed_tensors(tensors, p, qconfig) for p in packed}
    if method and method not in ("gptq", "compressed-tensors"):
        raise RuntimeInputError(f"unsupported quantization method '{method}' (the runtime reads gptq, "
                                "compressed-tensors and float checkpoints)")
    return "float", {}


def read_gptq(tensors: Mapping[str, Tensor], prefix: str, qconfig: dict) -> QuantizedWeight:
    bits = int(qconfig.get("bits", 4))
    if bits != 4:
        raise RuntimeInputError(f"{prefix}: {bits}-bit GPTQ weights (the runtime reads 4 bits)")
    qweight = tensors[prefix + ".qweight"]
    scales = tensors[prefix + ".scales"].float().t().contiguous()  # [out, groups]
    in_features = qweight.shape[0] * 8
    out_features = qweight.shape[1]
    codes = unpack_int32(qweight, bits, dim=0, size=in_features).t().contiguous()
    zeros = unpack_int32(tensors[prefix + ".qzeros"], bits, dim=1, size=out_features).t().to(torch.int32)
    if qconfig.get("checkpoint_format", "gptq") != "gptq_v2":
        zeros = zeros + 1  # v1 stores zero - 1
    g_idx = tensors.get(prefix + ".g_idx")
    group_size = int(qconfig.get("group_size", -1))
    return QuantizedWeight(
        codes=codes,
        scales=scales,
        zeros=zeros.contiguous(),
        bits=bits,
        group_size=group_size,
        symmetric=bool(qconfig.get("sym", True)),
        g_idx=None if g_idx is None else g_idx.to(torch.int32),
    )


def read_compressed_tensors(tensors: Mapping[str, Tensor], prefix: str, qconfig: dict) -> QuantizedWeight:
    weights_args = _ct_weight_args(qconfig)
    bits = int(weights_args.get("num_bits", 4))
    if bits != 4:
        raise RuntimeInputError(f"{prefix}: {bits}-bit compressed-tensors weights (the runtime reads 4 bits)")
    shape = tensors.get(prefix + ".weight_shape")
    scales = tensors[prefix + ".weight_scale"].float()
    packed = tensors[prefix + ".weight_packed"]
    out_features = packed.shape[0]
    in_features = int(shape[1]) if shape is not None else packed.shape[1] * 8
    if shape is not None:
        out_features = int(shape[0])
    codes = unpack_int32(packed, bits, dim=1, size=in_features)[:out_features].contiguous()
    zp = tensors.get(prefix + ".weight_zero_point")
    if zp is None or zp.numel() == 0:
        zeros = torch.full(scales.shape, 8, dtype=torch.int32)
    elif zp.dtype == torch.int32 and zp.shape[0] * 8 >= out_features and zp.shape[0] != out_features:
        # zero points packed along the output dimension, offset like the codes
        zeros = unpack_int32(zp, bits, dim=0, size=out_features).to(torch.int32)
    else:
        zeros = zp.to(torch.int32) + 8
    strategy = weights_args.get("strategy", "group")
    group_size = int(weights_args.get("group_size") or -1) if strategy == "group" else -1
    g_idx = tensors.get(prefix + ".weight_g_idx")
    return QuantizedWeight(
        codes=codes,
        scales=scales.reshape(out_features, -1).contiguous(),
        zeros=zeros.reshape(out_features, -1).contiguous(),
        bits=bits,
        group_size=group_size,
        symmetric=bool(weights_args.get("symmetric", True)),
        g_idx=None if g_idx is None else g_idx.to(torch.int32),
    )


def _ct_weight_args(qconfig: dict) -> dict:
    groups = qconfig.get("config_groups") or {}
    for group in groups.values():
        if group.get("weights"):
            return group["weights"]
    return {}
