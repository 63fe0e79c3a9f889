"""What every quantizing stage shares: which linears it targets and where records go."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from fnmatch import fnmatch

import torch
from torch import Tensor, nn

from compress.calibrate import LayerContext
from compress.quant.int4 import QuantArgs, QuantizedWeight

log = logging.getLogger("compress")


def is_ignored(name: str, patterns: list[str]) -> bool:
    """True if ``name`` (a full module name) matches a pattern, or its last parts do."""
    return any(fnmatch(name, p) or fnmatch(name, f"*.{p}") or name.endswith("." + p) for p in patterns)


class QuantizingStage:
    """Base of RTN and GPTQ: quantizes the linears of each layer, keeps their records."""

    name = "quantize"
    needs_calibration = True

    def __init__(self, args: QuantArgs, ignore: list[str] | None = None):
        self.args = args
        self.ignore = list(ignore or [])
        self.quantized: dict[str, QuantizedWeight] = {}
        self.notes: list[str] = []

    def targets(self, ctx: LayerContext, names: tuple[str, ...] | None = None) -> Iterator[tuple[str, nn.Linear]]:
        for short in names or ctx.arch.linears:
            full = f"{ctx.name}.{short}"
            if not is_ignored(full, self.ignore):
                yield short, ctx.submodule(short)

    def record(self, full_name: str, module: nn.Linear, qw: QuantizedWeight) -> None:
        """Keep the record (in CPU memory: on a GPU a run's records would add up to a model's
        worth of device memory) and put the weights it stands for into the model."""
        self.quantized[full_name] = qw.to("cpu")
        # In place: a new tensor would sit beside the loaded one (often pages of the mapped
        # checkpoint that stay resident), adding a model's worth of memory over a run.
        module.weight.data.copy_(qw.dequantize(module.weight.dtype))
        # Scales are stored in float16: a group whose range needs more is clipped. Rare
        # (weights beyond ~500k at 4 bits) but silent otherwise.
        saturated = int((qw.scales >= torch.finfo(torch.float16).max).sum())
        if saturated:
            message = f"{full_name}: {saturated} group(s) beyond the float16 scale range, clipped"
            self.notes.append(message)
            log.warning(message)


def dequantized_like(qw: QuantizedWeight, weight: Tensor) -> Tensor:
    return qw.dequantize(weight.dtype).to(weight.device)
