"""The layer-by-layer engine reproduces the full model when no stage changes anything."""

from __future__ import annotations

import os
import sys

import pytest
import torch

from compress.arch import arch_for
from compress.calibrate import capture_layer_inputs, release_pages, run_layerwise
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


def test_captured_arguments_equal_across_batches_are_kept_once(tiny_windows):
    """The rotary tables of same-length windows are equal in every batch: one tensor serves them
    all (a GPU run kept a copy per batch on the device); the hidden states stay per batch."""
    model = make_tiny_model(layers=1)
    windows = torch.cat([tiny_windows, tiny_windows])  # 12 windows: batches of 5, 5 and 2
    inputs = capture_layer_inputs(model, arch_for(model), windows, 5, "cpu")
    assert [h.shape[0] for h in inputs.hidden] == [5, 5, 2]
    cos = [kw["position_embeddings"][0] for kw in inputs.kwargs]
    assert cos[1] is cos[0] and all(torch.equal(c, cos[0]) for c in cos)
    with torch.no_grad():
        reference = run_layerwise(model, arch_for(model), windows, [], batch_size=12, progress=False)
    torch.testing.assert_close(torch.cat(run_layerwise(model, arch_for(model), windows, [], batch_size=5,
                                                       progress=False).hidden), torch.cat(reference.hidden))


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


# --------------------------------------------------------------------------- parking finished layers

needs_linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise: Linux only")


@needs_linux
def test_release_pages_hands_back_only_whole_pages_inside_the_tensor():
    page = os.sysconf("SC_PAGE_SIZE")
    t = torch.ones(3 * page)  # 12 pages of float32, wherever the allocator put them
    released = release_pages(t[5:-7])
    assert released > 0 and released % page == 0
    zero = (t == 0).nonzero().flatten()
    # The released pages read as zeros (private anonymous memory), contiguous, inside the slice.
    assert zero.numel() * 4 == released
    assert zero[0] >= 5 and zero[-1] < t.numel() - 7 and zero[-1] - zero[0] + 1 == zero.numel()
    assert release_pages(torch.ones(8)) == 0  # not one whole page


class Watcher:
    """After the first layer: what the second layer's stage finds in the first layer's weights."""

    name = "watcher"

    def __init__(self, model, raise_at: int | None = None):
        self.model, self.raise_at, self.first_layer_weights = model, raise_at, None

    def apply_layer(self, ctx):
        if ctx.index == 1:
            self.first_layer_weights = self.model.model.layers[0].mlp.up_proj.weight.detach().clone()
        if ctx.index == self.raise_at:
            raise RuntimeError("stop")


@needs_linux
def test_parked_layers_come_back_exactly_and_change_nothing(tiny_windows):
    from compress.quant.gptq import GPTQStage
    from compress.quant.int4 import QuantArgs

    results = {}
    for park in (False, True):
        model = make_tiny_model(layers=3, hidden=128, intermediate=512)
        stage, watcher = GPTQStage(QuantArgs(4, 32, True)), Watcher(model)
        out = run_layerwise(model, arch_for(model), tiny_windows, [stage, watcher], batch_size=4, progress=False,
                            park_finished_layers=park)
        for name, record in stage.quantized.items():
            assert torch.equal(model.get_submodule(name).weight.data, record.dequantize()), name
        results[park] = (stage.quantized, out.hidden, watcher.first_layer_weights, model.state_dict())
    (records, hidden, seen, state), (parked_records, parked_hidden, parked_seen, parked_state) = results.values()
    assert records.keys() == parked_records.keys()
    assert all(torch.equal(records[n].codes, parked_records[n].codes) for n in records)
    assert all(torch.equal(a, b) for a, b in zip(hidden, parked_hidden))
    assert all(torch.equal(state[k], parked_state[k]) for k in state)
    # While parked, the first layer's quantized weights were really handed back (they read zeros).
    assert torch.equal(seen, records["model.layers.0.mlp.up_proj"].dequantize())
    assert (parked_seen == 0).float().mean() > 0.5


@needs_linux
def test_parked_layers_come_back_when_a_run_fails(tiny_windows):
    from compress.quant.int4 import QuantArgs
    from compress.quant.rtn import RTNStage

    model = make_tiny_model(layers=3, hidden=128, intermediate=512)
    stage = RTNStage(QuantArgs(4, 32, True))
    with pytest.raises(RuntimeError, match="stop"):
        run_layerwise(model, arch_for(model), tiny_windows, [stage, Watcher(model, raise_at=2)], batch_size=4,
                      progress=False)
    assert len(stage.quantized) == 3 * 7
    for name, record in stage.quantized.items():
        assert torch.equal(model.get_submodule(name).weight.data, record.dequantize()), name
