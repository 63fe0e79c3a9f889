"""Drop decoder layers, chosen on calibration data: a cheap way to build a speculative draft.

Each layer is scored by its block influence (ShortGPT, Men et al. 2024): one minus the mean
cosine similarity between the hidden state entering the layer and the one leaving it. A layer
that barely turns the residual stream changes the output least when removed. The ``keep``
layers with the highest influence stay, in their original order.

The scores are gathered as the layer-by-layer engine passes each layer (one extra forward of
the layer); the layers are removed in ``finish``, once all are scored. Records of quantizing
stages that ran alongside are renamed to the new layer numbers with ``rename_quantized``.
"""

from __future__ import annotations

import re

import torch
from torch import Tensor, nn

from compress.arch import decoder_layers
from compress.calibrate import LayerContext


def block_influence(hidden_in: Tensor, hidden_out: Tensor) -> float:
    """1 - mean cosine similarity of each token's hidden state before and after a layer."""
    a = hidden_in.reshape(-1, hidden_in.shape[-1]).float()
    b = hidden_out.reshape(-1, hidden_out.shape[-1]).float()
    return float(1 - torch.nn.functional.cosine_similarity(a, b, dim=-1).mean())


def choose_layers(scores: list[float], keep: int) -> list[int]:
    """Indices of the ``keep`` most influential layers, in order (ties: the earlier layer stays)."""
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    return sorted(order[:keep])


def remove_layers(model: nn.Module, arch, kept: list[int]) -> dict[int, int]:
    """Keep only layers ``kept`` (old indices); returns old index -> new index."""
    layers = decoder_layers(model, arch)
    mapping = {old: new for new, old in enumerate(kept)}
    new_layers = nn.ModuleList(layers[i] for i in kept)
    for new, layer in enumerate(new_layers):
        # transformers finds a layer's cache slot by layer_idx.
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new
    parent_path, _, leaf = arch.layers_path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, leaf, new_layers)
    config = model.config
    if getattr(config, "layer_types", None):
        config.layer_types = [config.layer_types[i] for i in kept]
    config.num_hidden_layers = len(kept)
    return mapping


def rename_keys(names: dict, layers_path: str, mapping: dict[int, int]) -> dict:
    """Rename ``{layers_path}.{old}.…`` keys to the new layer numbers; keys of dropped layers go."""
    pattern = re.compile(rf"^{re.escape(layers_path)}\.(\d+)\.(.*)$")
    out = {}
    for name, value in names.items():
        m = pattern.match(name)
        if m is None:
            out[name] = value
        elif int(m.group(1)) in mapping:
            out[f"{layers_path}.{mapping[int(m.group(1))]}.{m.group(2)}"] = value
    return out


class DropLayersStage:
    """Keep the ``keep`` decoder layers of highest block influence on the calibration windows."""

    name = "drop_layers"
    needs_calibration = True

    def __init__(self, keep: int):
        self.keep = keep
        self.scores: dict[int, float] = {}
        self.mapping: dict[int, int] | None = None
        self.layers_path = ""
        self.notes: list[str] = []

    @classmethod
    def from_recipe(cls, entry) -> DropLayersStage:
        return cls(entry.keep)

    def apply_layer(self, ctx: LayerContext) -> None:
        outputs = ctx.forward()
        total, count = 0.0, 0
        for h_in, h_out in zip(ctx.inputs.hidden, outputs, strict=True):
            n = h_in.shape[0] * h_in.shape[1]
            total += block_influence(h_in, h_out) * n
            count += n
        self.scores[ctx.index] = total / count

    def resume_state(self) -> dict:
        """Scores of the layers done so far (a resumed run must not rescore them)."""
        # float64: the scores are Python floats; float32 would round them and could reorder near-ties.
        scores = torch.tensor(list(self.scores.values()), dtype=torch.float64)
        return {"layers": torch.tensor(list(self.scores)), "scores": scores}

    def load_resume_state(self, state: dict) -> None:
        self.scores = dict(zip(state["layers"].tolist(), state["scores"].tolist(), strict=True))

    def finish(self, model: nn.Module, arch, final=None) -> None:
        n = len(decoder_layers(model, arch))
        if self.keep >= n:
            self.notes.append(f"drop_layers: keep={self.keep} >= {n} layers, nothing dropped")
            return
        scores = [self.scores.get(i, float("inf")) for i in range(n)]
        kept = choose_layers(scores, self.keep)
        dropped = [i for i in range(n) if i not in kept]
        self.layers_path = arch.layers_path
        self.mapping = remove_layers(model, arch, kept)
        self.notes.append(
            f"drop_layers: kept {len(kept)} of {n} layers, dropped {dropped} "
            f"(block influence {', '.join(f'{scores[i]:.3f}' for i in dropped)})"
        )

    def rename_quantized(self, quantized: dict) -> dict:
        """Quantized records keyed by the new layer numbers (records of dropped layers removed)."""
        if self.mapping is None:
            return quantized
        return rename_keys(quantized, self.layers_path, self.mapping)
