"""From recipe entries to stage objects: the one table that knows every algorithm."""

from __future__ import annotations

import time

from compress import recipe as R
from compress.calibrate import LayerContext
from compress.quant.int4 import QuantArgs


class TimedStage:
    """Wraps a stage to add up the time it spends on layers."""

    def __init__(self, stage):
        self.stage = stage
        self.name = stage.name
        self.seconds = 0.0

    def apply_layer(self, ctx: LayerContext) -> None:
        t = time.perf_counter()
        self.stage.apply_layer(ctx)
        self.seconds += time.perf_counter() - t

    def __getattr__(self, item):
        return getattr(self.stage, item)


def build(entry, calibration_config=None):
    """The stage object for one recipe entry."""
    if isinstance(entry, R.RTNStage):
        from compress.quant.rtn import RTNStage

        return RTNStage(QuantArgs(entry.bits, entry.group_size, entry.symmetric), entry.ignore)
    if isinstance(entry, R.GPTQStage):
        from compress.quant.gptq import GPTQStage

        return GPTQStage.from_recipe(entry)
    if isinstance(entry, R.AWQStage):
        from compress.quant.awq import AWQStage

        return AWQStage.from_recipe(entry)
    if isinstance(entry, R.GQAStage):
        from compress.gqa import GQAStage

        return GQAStage.from_recipe(entry)
    if isinstance(entry, R.DropLayersStage):
        from compress.drop_layers import DropLayersStage

        return DropLayersStage.from_recipe(entry)
    raise R.RecipeError(f"unknown stage type {type(entry).__name__}")
