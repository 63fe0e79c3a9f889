"""The layer-by-layer engine keeps one layer's activations alive at a time.

A probe stage records weak references to every activation tensor it is shown; when layer i
is being compressed, every tensor recorded at an earlier layer must already be freed, and
so must the hidden states of the full model's other layers (never computed all at once).
The figure on the embedded model is in eval/results/memory.md (scripts/bench_memory.py).
"""

from __future__ import annotations

import gc
import weakref

import torch

from compress.arch import arch_for
from compress.calibrate import run_layerwise
from compress.quant.int4 import QuantArgs
from compress.quant.rtn import RTNStage
from tests.conftest import make_tiny_model


class LivenessProbe:
    """At each layer: which activation tensors seen at earlier layers are still alive?"""

    name = "probe"
    needs_calibration = True

    def __init__(self):
        self.seen: list[tuple[int, weakref.ref]] = []
        self.alive_from_earlier_layers: dict[int, int] = {}
        self.activation_shape: tuple[int, ...] | None = None

    def apply_layer(self, ctx) -> None:
        gc.collect()
        alive = [i for i, ref in self.seen if i < ctx.index and ref() is not None]
        self.alive_from_earlier_layers[ctx.index] = len(alive)
        # Activations inside the layer (the MLP's input) as well as the layer inputs.
        seen_inside: list[torch.Tensor] = []
        ctx.forward({"mlp.down_proj": lambda _m, inp, _o: seen_inside.append(inp[0])}, keep_outputs=False)
        for t in [*ctx.inputs.hidden, *seen_inside]:
            self.seen.append((ctx.index, weakref.ref(t)))
        self.activation_shape = tuple(ctx.inputs.hidden[0].shape)


def test_only_the_current_layers_activations_are_alive():
    model = make_tiny_model(layers=5)
    windows = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(0))
    probe = LivenessProbe()
    done: list[int] = []
    final = run_layerwise(
        model, arch_for(model), windows, [probe, RTNStage(QuantArgs(4, 32, True))], batch_size=2,
        progress=False, on_layer_done=lambda i, _inputs: done.append(i),
    )
    assert done == [0, 1, 2, 3, 4]
    assert probe.activation_shape == (2, 32, 64)
    assert probe.seen, "the probe saw no activations"
    assert probe.alive_from_earlier_layers == {i: 0 for i in range(5)}
    # After the run only the returned final hidden states remain.
    gc.collect()
    final_ids = {id(h) for h in final.hidden}
    alive = [ref() for _, ref in probe.seen if ref() is not None]
    assert all(id(t) not in final_ids for t in alive)
    assert alive == [], f"{len(alive)} activation tensors outlived the run"


def test_layers_go_back_home_after_their_turn():
    """Each layer is moved to the compute device for its turn and moved back before the next
    one moves (the order of the ``.to`` calls; on a GPU machine these are real transfers)."""
    model = make_tiny_model(layers=3)
    layers = model.model.layers
    where: dict[int, list[str]] = {}

    class DeviceProbe:
        name = "device-probe"

        def apply_layer(self, ctx):
            where[ctx.index] = [str(next(layer.parameters()).device) for layer in layers]

    moves: list[tuple[int, str]] = []
    for i, layer in enumerate(layers):
        original = layer.to

        def to(*args, _original=original, _i=i, **kwargs):
            moves.append((_i, str(args[0]) if args else str(kwargs.get("device"))))
            return _original(*args, **kwargs)

        layer.to = to
    windows = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(0))
    run_layerwise(model, arch_for(model), windows, [DeviceProbe()], device="cpu", progress=False)
    # Each layer: moved to the device, then back home, before the next one moves.
    assert moves == [(0, "cpu"), (0, "cpu"), (1, "cpu"), (1, "cpu"), (2, "cpu"), (2, "cpu")]
    assert where == {i: ["cpu"] * 3 for i in range(3)}
