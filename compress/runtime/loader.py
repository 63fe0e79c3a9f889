"""Build the runtime model from checkpoint tensors, without transformers model classes.

Inputs are Hugging Face names (``model.layers.0.self_attn.q_proj.weight``...). A linear is
either a float ``.weight`` or an int4 record (compress.quant.int4.QuantizedWeight) read from
the GPTQ (``qweight``/``qzeros``/``scales``/``g_idx``) or compressed-tensors
(``weight_packed``/``weight_scale``/``weight_zero_point``) tensors of an exported folder.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from compress import checkpoint
from compress.quant.int4 import QuantArgs, QuantizedWeight, quantize
from compress.runtime.draft_head import ShortlistHead
from compress.runtime.errors import RuntimeInputError
from compress.runtime.int4_linear import Int4Linear, concat_quantized
from compress.runtime.model import ConcatLinear, ModelArgs, Transformer

log = logging.getLogger(__name__)

# float: as stored; int4: quantized at load; shortlist: int4 ranking with the best candidates rescored on
# the stored weights (compress.runtime.draft_head, meant for speculative drafts).
HEAD_MODES = ("float", "int4", "shortlist")


@dataclass
class LoadInfo:
    """What was loaded, for messages and benchmarks."""

    source: str
    quant_format: str  # "float", "gptq", "compressed-tensors", "memory"
    backends: dict[str, int] = field(default_factory=dict)  # back end -> number of int4 linears
    weight_bytes: int = 0  # bytes of weights read per decoded token (embedding row excluded)


def load_folder(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                backend: str = "auto", head: str = "float") -> tuple[Transformer, LoadInfo]:
    """``dtype`` None: bfloat16 on CUDA, and on CPU for int4 weights on the kernel; else float32."""
    folder = Path(path).expanduser()
    try:  # the same reader as `compress eval`: manifest checksums, sharded indexes, every layout
        ckpt = checkpoint.read(folder)
    except checkpoint.CheckpointError as e:
        raise RuntimeInputError(str(e)) from None
    config, tensors, quantized, quant_format = ckpt.config, ckpt.tensors, ckpt.quantized, ckpt.format
    for name, qw in quantized.items():
        if qw.bits != 4:
            raise RuntimeInputError(f"{name}: {qw.bits}-bit weights (the runtime reads 4 bits)")
    if dtype is None:
        on_kernel = (bool(quantized) or head == "int4") and backend != "reference"
        dtype = torch.bfloat16 if torch.device(device).type == "cuda" or on_kernel else torch.float32
    model, info = build_model(config, tensors, quantized, device=device, dtype=dtype, backend=backend, head=head)
    info.source, info.quant_format = str(folder), quant_format
    return model, info


def build_model(
    config: dict,
    tensors: Mapping[str, Tensor],
    quantized: Mapping[str, QuantizedWeight] | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    backend: str = "auto",
    head: str = "float",
) -> tuple[Transformer, LoadInfo]:
    """A ready model from float ``tensors`` and int4 ``quantized`` records keyed by module name.

    ``head='int4'`` quantizes a float output layer at load (round to nearest, group 128):
    it is a fifth of a small model's weight bytes and dominates its decode time.
    ``head='shortlist'`` ranks the vocabulary with such an int4 copy and rescores the best candidates
    on the stored weights (``ShortlistHead``): nearly the float head's argmax at nearly int4 cost.
    """
    if head not in HEAD_MODES:
        raise RuntimeInputError(f"unknown head mode '{head}'; use one of {', '.join(HEAD_MODES)}")
    quantized = dict(quantized or {})
    args = ModelArgs.from_config(config)
    device = torch.device(device)
    info = LoadInfo(source="memory", quant_format="memory" if quantized else "float")
    with torch.device("meta"):
        model = Transformer(args)

    def get(name: str) -> Tensor:
        if name not in tensors:
            raise RuntimeInputError(f"checkpoint lacks tensor '{name}'")
        return tensors[name]

    def linear(prefixes: list[str], bias: bool = False) -> nn.Module:
        """One module computing the concatenated outputs of the linears at ``prefixes``."""
        biases = [get(p + ".bias") for p in prefixes] if bias else None
        fused_bias = torch.cat(biases) if biases else None
        if all(p in quantized for p in prefixes):
            parts = [quantized[p] for p in prefixes]
            fused = concat_quantized(parts)
            if fused is not None:
                return _int4(fused, fused_bias)
            return ConcatLinear([_int4(q, b) for q, b in zip(parts, biases or [None] * len(parts))])
        weights = [quantized[p].dequantize(torch.float32) if p in quantized else get(p + ".weight")
                   for p in prefixes]
        return _float_linear(torch.cat(weights), fused_bias)

    def _int4(qw: QuantizedWeight, bias: Tensor | None) -> Int4Linear:
        module = Int4Linear(qw, bias, backend=backend, device=device, dtype=dtype)
        info.backends[module.backend] = info.backends.get(module.backend, 0) + 1
        info.weight_bytes += qw.nbytes_packed()
        return module

    def _float_linear(weight: Tensor, bias: Tensor | None) -> nn.Linear:
        m = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=device, dtype=dtype)
        m.weight = nn.Parameter(weight.to(device, dtype), requires_grad=False)
        if bias is not None:
            m.bias = nn.Parameter(bias.to(device, dtype), requires_grad=False)
        info.weight_bytes += weight.numel() * m.weight.element_size()
        return m

    def norm(module: nn.Module, name: str) -> None:
        module.weight = nn.Parameter(get(name).to(device, dtype), requires_grad=False)

    embed = get("model.embed_tokens.weight").to(device, dtype)
    model.tok_embeddings = nn.Embedding.from_pretrained(embed, freeze=True)
    for i, layer in enumerate(model.layers):
        pre = f"model.layers.{i}."
        attn = [pre + f"self_attn.{n}_proj" for n in ("q", "k", "v")]
        layer.attention.wqkv = linear(attn, bias=args.qkv_bias)
        layer.attention.wo = linear([pre + "self_attn.o_proj"])
        layer.feed_forward.w13 = linear([pre + "mlp.gate_proj", pre + "mlp.up_proj"])
        layer.feed_forward.w2 = linear([pre + "mlp.down_proj"])
        norm(layer.attention_norm, pre + "input_layernorm.weight")
        norm(layer.ffn_norm, pre + "post_attention_layernorm.weight")
    norm(model.norm, "model.norm.weight")

    if "lm_head" in quantized:
        model.output = _int4(quantized["lm_head"], None)
    else:
        head_weight = embed if args.tie_word_embeddings or "lm_head.weight" not in tensors else get("lm_head.weight")
        if head == "int4":
            model.output = _int4(quantize(head_weight.float().cpu(), QuantArgs(4, 128, True)), None)
        elif head == "shortlist":
            shortlist = ShortlistHead(head_weight.to(device, dtype), backend=backend)
            model.output = shortlist
            info.backends[shortlist.approx.backend] = info.backends.get(shortlist.approx.backend, 0) + 1
            info.weight_bytes += head_weight.numel() * shortlist.weight.element_size()
        elif head_weight is embed:
            model.output = nn.Linear(args.hidden_size, args.vocab_size, bias=False, device="meta")
            model.output.weight = model.tok_embeddings.weight  # tied: one tensor in memory
            info.weight_bytes += embed.numel() * embed.element_size()
        else:
            model.output = _float_linear(head_weight, None)
    for name, buf in list(model.named_buffers()):
        if buf.is_meta:
            _set_buffer(model, name, torch.empty(0, dtype=buf.dtype, device=device))
    return model.eval().requires_grad_(False), info


def _set_buffer(model: nn.Module, name: str, value: Tensor) -> None:
    *path, leaf = name.split(".")
    module = model
    for p in path:
        module = getattr(module, p)
    module._buffers[leaf] = value


def from_transformers(hf_model, quantized: Mapping[str, QuantizedWeight] | None = None, **kwargs):
    """Runtime model from an in-memory transformers model (tests, benchmarks)."""
    config = hf_model.config.to_dict()
    state = {k: v.detach() for k, v in hf_model.state_dict().items()}
    return build_model(config, state, quantized, **kwargs)
