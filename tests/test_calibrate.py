"""The layer-by-layer engine reproduces the full model when no stage changes anything."""

from __future__ import annotations

import torch

from compress.arch import arch_for
from compress.calibrate import run_layerwise
from tests.conftest import make_tiny_model


class Recorder:
    name = "recorder"
    needs_calibration = True

    def __init__(self):
        self.seen: list[int] = []

    def apply_layer(self, ctx):
        self.seen.append(ctx.index)
        assert ctx.name == f"model.layers.{ctx.index}"


def test_layerwise_reproduces_hidden_states_and_logits(tiny_windows):
    for model_type in ("llama", "mistral", "qwen2"):
        model = make_tiny_model(model_type, layers=3)
        arch = arch_for(model)
        with torch.no_grad():
            full = model(input_ids=tiny_windows, output_hidden_states=True)
        rec = Recorder()
        outputs = run_layerwise(model, arch, tiny_windows, [rec], batch_size=4, progress=False)
        assert rec.seen == [0, 1, 2]
        last = torch.cat(outputs.hidden)
        with torch.no_grad():
            logits = model.lm_head(model.model.norm(last))
        torch.testing.assert_close(logits, full.logits, rtol=1e-5, atol=1e-5)
        # Every intermediate layer output matches too (hidden_states[i+1] is layer i's output).
        torch.testing.assert_close(
            torch.cat(run_layerwise(model, arch, tiny_windows, [], batch_size=6, progress=False).hidden),
            last,
        )


def test_stage_rewrite_feeds_next_layer(tiny_windows):
    """Outputs of a rewritten layer are what the next layer sees."""
    model = make_tiny_model(layers=2)
    arch = arch_for(model)

    class ZeroMLP:
        name = "zero-mlp"

        def apply_layer(self, ctx):
            if ctx.index == 0:
                ctx.submodule("mlp.down_proj").weight.data.zero_()

    outputs = run_layerwise(model, arch, tiny_windows, [ZeroMLP()], batch_size=3, progress=False)
    with torch.no_grad():
        full = model(input_ids=tiny_windows).logits  # the model now has the rewrite
        logits = model.lm_head(model.model.norm(torch.cat(outputs.hidden)))
    torch.testing.assert_close(logits, full, rtol=1e-5, atol=1e-5)
