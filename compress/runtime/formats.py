"""Find the int4 linears of an exported checkpoint and read them into QuantizedWeight records.

The tensor layouts live in compress/quant/formats.py (GPTQ v1/v2, compressed-tensors
``pack-quantized``); this module only reads the config to know which layout, bits, group
size and symmetry apply, and groups the tensors by module.
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor

from compress.quant import formats as layouts
from compress.quant.int4 import QuantizedWeight
from compress.runtime.errors import RuntimeInputError


def read_quantized(tensors: Mapping[str, Tensor], config: dict) -> tuple[str, dict[str, QuantizedWeight]]:
    """(format name, {module name: record}) for every int4 linear in ``tensors``."""
    qconfig = config.get("quantization_config") or config.get("compression_config") or {}
    method = qconfig.get("quant_method", "")
    gptq = _group(tensors, layouts.GPTQ_KEYS, "qweight")
    packed = _group(tensors, layouts.CT_KEYS, "weight_packed")
    try:
        if gptq:
            return "gptq", {p: read_gptq(t, qconfig) for p, t in gptq.items()}
        if packed:
            return "compressed-tensors", {p: read_compressed_tensors(t, qconfig) for p, t in packed.items()}
    except (layouts.FormatError, KeyError) as e:
        raise RuntimeInputError(f"cannot read the quantized weights: {e}") from e
    if method and method not in ("gptq", "compressed-tensors"):
        raise RuntimeInputError(
            f"unsupported quantization method '{method}' (the runtime reads gptq, compressed-tensors and float)"
        )
    return "float", {}


def _group(tensors: Mapping[str, Tensor], keys: tuple[str, ...], marker: str) -> dict[str, dict[str, Tensor]]:
    """{module prefix: {leaf: tensor}} for modules that have ``marker`` among their tensors."""
    grouped: dict[str, dict[str, Tensor]] = {}
    for name, tensor in tensors.items():
        split = layouts.split_prefix(name, keys)
        if split:
            grouped.setdefault(split[0], {})[split[1]] = tensor
    return {p: t for p, t in grouped.items() if marker in t}


def read_gptq(tensors: dict[str, Tensor], qconfig: dict) -> QuantizedWeight:
    bits = int(qconfig.get("bits", 4))
    if bits != 4:
        raise RuntimeInputError(f"{bits}-bit GPTQ weights (the runtime reads 4 bits)")
    fmt = qconfig.get("checkpoint_format", layouts.GPTQ_V1)
    return layouts.gptq_unpack(tensors, bits, int(qconfig.get("group_size", -1)), bool(qconfig.get("sym", True)), fmt)


def read_compressed_tensors(tensors: dict[str, Tensor], qconfig: dict) -> QuantizedWeight:
    weights = _ct_weight_args(qconfig)
    bits = int(weights.get("num_bits", 4))
    if bits != 4:
        raise RuntimeInputError(f"{bits}-bit compressed-tensors weights (the runtime reads 4 bits)")
    group_size = int(weights.get("group_size") or -1) if weights.get("strategy", "group") == "group" else -1
    return layouts.ct_unpack(tensors, bits, group_size, bool(weights.get("symmetric", True)))


def _ct_weight_args(qconfig: dict) -> dict:
    for group in (qconfig.get("config_groups") or {}).values():
        if group.get("weights"):
            return group["weights"]
    return {}
