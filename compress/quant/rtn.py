"""Round-to-nearest: the baseline every other method is measured against."""

from __future__ import annotations

from compress.calibrate import LayerContext
from compress.quant import int4
from compress.quant.common import QuantizingStage


class RTNStage(QuantizingStage):
    name = "rtn"
    needs_calibration = False

    def apply_layer(self, ctx: LayerContext) -> None:
        for short, module in self.targets(ctx):
            self.record(f"{ctx.name}.{short}", module, int4.quantize(module.weight.data, self.args))
