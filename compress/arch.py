"""How each supported architecture is laid out: the facts algorithms need, no algorithm.

Every name is relative to a decoder layer (``model.model.layers[i]``) unless stated.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn


class UnsupportedArchitecture(ValueError):
    pass


@dataclass(frozen=True)
class ScalingPair:
    """An AWQ scaling pair: ``prev`` (a norm or linear) feeds ``linears``.

    Scaling the output channels of ``prev`` by 1/s and the input columns of every
    linear in ``linears`` by s leaves the function unchanged. ``inspect`` is the
    module whose output error the scale search minimizes (its input is what the
    linears see).
    """

    prev: str
    linears: tuple[str, ...]
    inspect: str
    # v_proj → o_proj: with grouped KV heads a value channel feeds several o_proj
    # input columns (one per query head of its group).
    kv_to_heads: bool = False


@dataclass(frozen=True)
class Arch:
    name: str
    model_types: tuple[str, ...]
    # Linears quantized in true-sequential order: each inner tuple shares one input.
    sequential: tuple[tuple[str, ...], ...] = (
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        ("self_attn.o_proj",),
        ("mlp.gate_proj", "mlp.up_proj"),
        ("mlp.down_proj",),
    )
    scaling_pairs: tuple[ScalingPair, ...] = (
        ScalingPair(
            "input_layernorm",
            ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
            "self_attn",
        ),
        ScalingPair("self_attn.v_proj", ("self_attn.o_proj",), "self_attn.o_proj", kv_to_heads=True),
        ScalingPair("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"), "mlp"),
        ScalingPair("mlp.up_proj", ("mlp.down_proj",), "mlp.down_proj"),
    )
    q_proj: str = "self_attn.q_proj"
    k_proj: str = "self_attn.k_proj"
    v_proj: str = "self_attn.v_proj"
    o_proj: str = "self_attn.o_proj"
    input_norm: str = "input_layernorm"
    post_attention_norm: str = "post_attention_layernorm"
    attention: str = "self_attn"
    mlp: str = "mlp"
    layers_path: str = "model.layers"
    embed_path: str = "model.embed_tokens"
    final_norm_path: str = "model.norm"
    rotary_path: str = "model.rotary_emb"
    lm_head_path: str = "lm_head"
    qkv_bias: bool = False
    extra: dict = field(default_factory=dict)

    @property
    def linears(self) -> tuple[str, ...]:
        return tuple(name for group in self.sequential for name in group)


LLAMA = Arch(name="llama", model_types=("llama",))
MISTRAL = Arch(name="mistral", model_types=("mistral",))
QWEN2 = Arch(name="qwen2", model_types=("qwen2",), qkv_bias=True)

ARCHS: tuple[Arch, ...] = (LLAMA, MISTRAL, QWEN2)


def supported_model_types() -> list[str]:
    return sorted(t for a in ARCHS for t in a.model_types)


def arch_for_model_type(model_type: str) -> Arch:
    for arch in ARCHS:
        if model_type in arch.model_types:
            return arch
    raise UnsupportedArchitecture(
        f"unsupported architecture '{model_type}'; supported: {', '.join(supported_model_types())}"
    )


def arch_for(model: nn.Module) -> Arch:
    return arch_for_model_type(getattr(model.config, "model_type", "unknown"))


def get_module(root: nn.Module, path: str) -> nn.Module:
    return root.get_submodule(path) if path else root


def set_module(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(get_module(root, parent), name, module)


def decoder_layers(model: nn.Module, arch: Arch | None = None) -> nn.ModuleList:
    arch = arch or arch_for(model)
    return get_module(model, arch.layers_path)  # type: ignore[return-value]


def head_counts(config) -> tuple[int, int, int]:
    """(query heads, KV heads, head dim) of a config."""
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return heads, kv_heads, head_dim


def kv_cache_bytes_per_token(config, bytes_per_value: int = 2) -> int:
    """Bytes of K and V cached per token over all layers (float16 by default)."""
    _, kv_heads, head_dim = head_counts(config)
    return 2 * config.num_hidden_layers * kv_heads * head_dim * bytes_per_value
