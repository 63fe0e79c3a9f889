"""A lean Llama-family decoder (Llama, SmolLM, Mistral, Qwen2) with a static KV cache.

gpt-fast style: the cache is preallocated ``[batch, kv_heads, max_len, head_dim]`` and
indexed by position, so a forward pass writes its keys and values at ``input_pos`` and a
speculative rollback is nothing more than writing the next tokens over the same positions.

    model.setup_caches(batch, max_len)
    logits = model(tokens [B, T], input_pos [T])      # prefill (T > 1) or decode (T == 1)

Linears are plain ``nn.Linear`` here; the loader swaps in int4 linears. q/k/v and
gate/up are fused into one linear each (one kernel call instead of three or two).
Weights use the Hugging Face layout (rotate-half RoPE), so checkpoints load unchanged.

On CPU the eager forward is ``Transformer._forward_fast``: the same computation as the modules
with the per-operator overhead of a small model's decode step cut (a 135M model's step is
~30 layers x ~40 small operators around 4 int4 kernel calls each), and a float32 KV cache for
16-bit models (attention in float32 over the same rounded values). The module forward stays
the path on CUDA (and under torch.compile), and the oracle the fast path is tested against.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from compress.runtime.errors import RuntimeInputError

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


@dataclass
class ModelArgs:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict = field(default_factory=dict)  # {"rope_type": ..., "factor": ...}
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    sliding_window: int | None = None
    model_type: str = "llama"

    @classmethod
    def from_config(cls, config: dict) -> ModelArgs:
        """Read a Hugging Face ``config.json`` dict (transformers 4 or 5 field names)."""
        model_type = config.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise RuntimeInputError(
                f"the runtime supports model types {', '.join(SUPPORTED_MODEL_TYPES)}; this checkpoint is "
                f"'{model_type}' (use transformers for it)"
            )
        if config.get("hidden_act", "silu") != "silu":
            raise RuntimeInputError(f"unsupported hidden_act '{config.get('hidden_act')}' (the runtime has silu)")
        heads = config["num_attention_heads"]
        hidden = config["hidden_size"]
        # transformers 5 keeps theta and scaling in rope_parameters; 4.x in rope_theta / rope_scaling.
        rope = dict(config.get("rope_parameters") or {})
        rope.update(config.get("rope_scaling") or {})
        theta = rope.get("rope_theta", config.get("rope_theta", 10000.0))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise RuntimeInputError(
                f"unsupported RoPE scaling '{rope_type}'; the runtime has {', '.join(SUPPORTED_ROPE_TYPES)}"
            )
        if config.get("partial_rotary_factor", 1.0) != 1.0:
            raise RuntimeInputError("partial rotary embeddings are not supported by the runtime")
        sliding = config.get("sliding_window")
        if model_type == "qwen2" and not config.get("use_sliding_window", False):
            sliding = None
        bias = model_type == "qwen2" or bool(config.get("attention_bias", False))
        if config.get("mlp_bias", False):
            raise RuntimeInputError("MLP biases are not supported by the runtime")
        return cls(
            vocab_size=config["vocab_size"],
            hidden_size=hidden,
            intermediate_size=config["intermediate_size"],
            num_layers=config["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=config.get("num_key_value_heads") or heads,
            head_dim=config.get("head_dim") or hidden // heads,
            rms_norm_eps=config.get("rms_norm_eps", 1e-6),
            rope_theta=float(theta),
            rope_scaling={**rope, "rope_type": rope_type},
            max_position_embeddings=config.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            qkv_bias=bias,
            sliding_window=sliding,
            model_type=model_type,
        )


def rope_inv_freq(args: ModelArgs) -> tuple[Tensor, float]:
    """Inverse frequencies [head_dim / 2] and the attention scaling, as transformers computes them."""
    dim = args.head_dim
    inv_freq = 1.0 / (args.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scaling = args.rope_scaling
    kind = scaling.get("rope_type", "default")
    if kind == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif kind == "llama3":
        factor = scaling["factor"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old_len / high) * ~(wavelen > old_len / low)
        inv_freq = torch.where(medium, smoothed, scaled)
    return inv_freq, 1.0


def rope_table(args: ModelArgs, length: int) -> Tensor:
    """cos and signed sin for every position: float32 [length, 2, head_dim].

    Rotate-half RoPE is ``x·cos + rotate_half(x)·sin``; ``rotate_half(x) = sign · roll(x, D/2)``
    with sign −1 on the first half, so the table holds ``sign · sin`` and the rotation is one roll.
    """
    inv_freq, attention_scaling = rope_inv_freq(args)
    freqs = torch.outer(torch.arange(length, dtype=torch.float32), inv_freq)
    emb = torch.cat([freqs, freqs], dim=-1)
    sign = torch.cat([-torch.ones_like(inv_freq), torch.ones_like(inv_freq)])
    return torch.stack([emb.cos() * attention_scaling, sign * emb.sin() * attention_scaling], dim=1)


def apply_rope(x: Tensor, rope: Tensor) -> Tensor:
    """x [B, T, heads, D], rope [T, 2, D] in x's dtype (as transformers does) -> rotated x."""
    cos, signed_sin = rope[:, None, 0], rope[:, None, 1]
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * signed_sin


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # float32 statistics as transformers computes them, then the weight in the model's dtype
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)


class KVCache(nn.Module):
    """Keys and values for every position up to ``max_len``; a write overwrites in place."""

    def __init__(self, batch: int, kv_heads: int, max_len: int, head_dim: int, dtype: torch.dtype, device=None):
        super().__init__()
        shape = (batch, kv_heads, max_len, head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, input_pos: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        self.k_cache[:, :, input_pos] = k.to(self.k_cache.dtype)
        self.v_cache[:, :, input_pos] = v.to(self.v_cache.dtype)
        return self.k_cache, self.v_cache


class ConcatLinear(nn.Module):
    """Several linears on one input, outputs concatenated: used when weights cannot be fused."""

    def __init__(self, parts: list[nn.Module]):
        super().__init__()
        self.parts = nn.ModuleList(parts)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([p(x) for p in self.parts], dim=-1)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = args.num_heads, args.num_kv_heads, args.head_dim
        qkv_out = (self.n_heads + 2 * self.n_kv) * self.head_dim
        self.wqkv: nn.Module = nn.Linear(args.hidden_size, qkv_out, bias=args.qkv_bias)
        self.wo: nn.Module = nn.Linear(self.n_heads * self.head_dim, args.hidden_size, bias=False)
        self.kv_cache: KVCache | None = None

    def forward(self, x: Tensor, rope: Tensor, mask: Tensor | None, input_pos: Tensor, kv_len: int | None) -> Tensor:
        """``mask`` None: every key up to ``kv_len`` is visible, causally (no padding, no window)."""
        bsz, seqlen, _ = x.shape
        q_size, kv_size = self.n_heads * self.head_dim, self.n_kv * self.head_dim
        qkv = self.wqkv(x)
        # RoPE on queries and keys together: one rotation for both.
        qk = apply_rope(qkv[..., : q_size + kv_size].view(bsz, seqlen, self.n_heads + self.n_kv, self.head_dim), rope)
        q = qk[:, :, : self.n_heads].transpose(1, 2)
        k = qk[:, :, self.n_heads :].transpose(1, 2)
        v = qkv[..., q_size + kv_size :].view(bsz, seqlen, self.n_kv, self.head_dim).transpose(1, 2)
        if self.kv_cache is None:
            raise RuntimeError("call model.setup_caches(batch, max_len) before forward")
        k, v = self.kv_cache.update(input_pos, k, v)
        if kv_len is not None:  # eager: attend over the filled prefix only, not the whole cache
            k, v = k[:, :, :kv_len], v[:, :, :kv_len]
            if mask is not None:
                mask = mask[..., :kv_len]
        # Without a mask: one query sees every key; a prefill from position 0 is plain causal.
        causal = mask is None and seqlen > 1
        # A float32 cache (CPU, 16-bit model) holds the same rounded keys and values; attention runs in it.
        y = F.scaled_dot_product_attention(q.to(k.dtype), k, v, attn_mask=mask, is_causal=causal,
                                           enable_gqa=self.n_heads != self.n_kv)
        y = y.transpose(1, 2).reshape(bsz, seqlen, q_size).to(x.dtype)
        return self.wo(y)


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.intermediate = args.intermediate_size
        self.w13: nn.Module = nn.Linear(args.hidden_size, 2 * args.intermediate_size, bias=False)  # gate, up
        self.w2: nn.Module = nn.Linear(args.intermediate_size, args.hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.w13(x).split([self.intermediate, self.intermediate], dim=-1)
        return self.w2(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args)
        self.attention_norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.ffn_norm = RMSNorm(args.hidden_size, args.rms_norm_eps)

    def forward(self, x: Tensor, rope: Tensor, mask: Tensor | None, input_pos: Tensor, kv_len: int | None) -> Tensor:
        h = x + self.attention(self.attention_norm(x), rope, mask, input_pos, kv_len)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(Block(args) for _ in range(args.num_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.output: nn.Module = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        self.max_batch = 0
        self.max_len = 0
        # Set by the caller: eager runs slice attention to the filled prefix; a compiled
        # decode step keeps static shapes and attends over the whole (masked) cache.
        self.slice_kv = True
        # The streamlined eager forward (_forward_fast); None: on CPU only (CUDA keeps the module path,
        # whose compiled step is what CUDA runs fast). False forces the module path (the tests' oracle).
        self.fast_path: bool | None = None
        self._plan: tuple[list[tuple], Callable[[Tensor], Tensor]] | None = None
        # A speculative draft's one-token steps on CPU take ``_draft_step``: fewer operators, rounded
        # differently from transformers (a draft only has to agree often; the output stays exact).
        self.draft_steps = False
        self._draft_plan: tuple | None = None
        self.windowed = False
        self.register_buffer("rope", torch.empty(0), persistent=False)
        self.register_buffer("causal_mask", torch.empty(0, dtype=torch.bool), persistent=False)
        self.register_buffer("key_valid", torch.empty(0, dtype=torch.bool), persistent=False)

    @property
    def dtype(self) -> torch.dtype:
        return self.tok_embeddings.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.tok_embeddings.weight.device

    def setup_caches(self, max_batch: int, max_len: int) -> None:
        """Preallocate the KV cache for ``max_batch`` sequences of up to ``max_len`` positions."""
        if max_len > self.args.max_position_embeddings:
            raise RuntimeInputError(
                f"{max_len} positions exceed the model's context of {self.args.max_position_embeddings}"
            )
        if max_batch == self.max_batch and max_len == self.max_len:
            self.set_padding(None)
            self._plan = self._draft_plan = None
            return  # keep the buffers: a compiled step and its CUDA graphs hold on to them
        a = self.args
        self._plan = self._draft_plan = None  # rebuilt from the current modules on the next forward
        cache_dtype = cache_dtype_for(self.dtype, self.device)
        for layer in self.layers:
            layer.attention.kv_cache = KVCache(max_batch, a.num_kv_heads, max_len, a.head_dim, cache_dtype,
                                               self.device)
        self.max_batch, self.max_len = max_batch, max_len
        self.rope = rope_table(a, max_len).to(self.device, self.dtype)
        mask = torch.ones(max_len, max_len, dtype=torch.bool, device=self.device).tril()
        self.windowed = a.sliding_window is not None and a.sliding_window < max_len
        if self.windowed:
            mask &= ~torch.ones_like(mask).tril(-a.sliding_window)
        self.causal_mask = mask
        self.set_padding(None)

    def set_padding(self, pad_lens: Tensor | list[int] | None) -> None:
        """Mark the first ``pad_lens[b]`` positions of row b as padding (left-padded batch)."""
        if pad_lens is None:
            self.key_valid = torch.empty(0, dtype=torch.bool, device=self.device)
            return
        pad = torch.as_tensor(pad_lens, device=self.device).view(-1, 1)
        self.key_valid = torch.arange(self.max_len, device=self.device)[None] >= pad

    def attention_mask(self, input_pos: Tensor) -> Tensor:
        """Boolean [B or 1, 1, T, max_len]: causal, minus left padding."""
        mask = self.causal_mask[input_pos]  # [T, L]
        if self.key_valid.numel() == 0:
            return mask[None, None]
        # Pad positions attend to themselves only, so their (unused) outputs stay finite
        # and never put NaN into the cache; real tokens never see them.
        diagonal = torch.arange(self.max_len, device=mask.device)[None] == input_pos[:, None]
        mask = mask[None] & (self.key_valid[:, None, :] | diagonal[None])
        return mask[:, None]

    def forward(self, tokens: Tensor, input_pos: Tensor) -> Tensor:
        """Logits [B, T, V] (float32) for ``tokens`` [B, T] written at positions ``input_pos`` [T]."""
        if self.max_len == 0:
            raise RuntimeError("call model.setup_caches(batch, max_len) before forward")
        kv_len = None
        mask = None
        if self.slice_kv:
            kv_len = int(input_pos[-1]) + 1
            seqlen = tokens.shape[1]
            # The cheap paths need no mask: a decode step, or a prefill that starts at 0.
            plain = self.key_valid.numel() == 0 and not self.windowed and (seqlen == 1 or kv_len == seqlen)
            if not plain:
                mask = self.attention_mask(input_pos)
        else:
            mask = self.attention_mask(input_pos)
        if self.slice_kv and (self.fast_path if self.fast_path is not None else self.device.type == "cpu"):
            if self.draft_steps and mask is None and tokens.shape == (1, 1):
                return self._draft_step(tokens, int(input_pos[0]))
            return self._forward_fast(tokens, input_pos, mask, kv_len)
        rope = self.rope[input_pos]
        x = self.tok_embeddings(tokens)
        for layer in self.layers:
            x = layer(x, rope, mask, input_pos, kv_len)
        return self.output(self.norm(x)).float()

    # -- the streamlined eager forward ---------------------------------------------------
    # The same computation as the modules above with a decode step's per-operator overhead cut:
    # activations stay 2-D [tokens, features] (the kernels' shape), each linear is a prebuilt closure,
    # a layer's tensors are unpacked from a tuple built once, no module calls, in-place residual adds,
    # and a decode step writes its one cache position with a slice copy instead of an index_put.

    def _build_plan(self) -> tuple[list[tuple], Callable[[Tensor], Tensor]]:
        """Per layer: its norms and linears as closures and its cache tensors; then the final norm + head."""
        dtype = self.dtype
        layers = []
        for layer in self.layers:
            attn, ffn = layer.attention, layer.feed_forward
            layers.append((
                _norm_fn(layer.attention_norm, dtype), _linear_fn(attn.wqkv, dtype), _linear_fn(attn.wo, dtype),
                _norm_fn(layer.ffn_norm, dtype), _linear_fn(ffn.w13, dtype), _linear_fn(ffn.w2, dtype),
                attn.kv_cache.k_cache, attn.kv_cache.v_cache,
            ))
        norm, output = _norm_fn(self.norm, dtype), _linear_fn(self.output, dtype)
        return layers, lambda x: output(norm(x))

    def forward_tree(self, tokens: Tensor, input_pos: Tensor, cache_pos: Tensor, visible: Tensor) -> Tensor:
        """Logits [1, T, V] of a token tree: token t at RoPE position ``input_pos[t]``, its keys and values
        written to cache slot ``cache_pos[t]``, attending to the slots ``visible[t]`` marks ([T, slots]).

        Lets siblings (alternatives for one position) be verified in one pass: they share a position but
        not a slot. CPU streamlined forward, batch 1, unpadded caches only (``supports_tree``).
        """
        if not self.supports_tree:
            raise RuntimeError("forward_tree needs the CPU streamlined forward on unpadded caches")
        kv_len = visible.shape[-1]
        return self._forward_fast(tokens, input_pos, visible[None, None], kv_len, cache_pos)

    @property
    def supports_tree(self) -> bool:
        fast = self.fast_path if self.fast_path is not None else self.device.type == "cpu"
        return bool(fast and self.slice_kv and self.max_len and self.key_valid.numel() == 0 and not self.windowed)

    def _forward_fast(self, tokens: Tensor, input_pos: Tensor, mask: Tensor | None, kv_len: int,
                      cache_pos: Tensor | None = None) -> Tensor:
        """``cache_pos``: cache slots to write (default ``input_pos``; differs only in a tree pass)."""
        if self._plan is None:
            self._plan = self._build_plan()
        layers, head = self._plan
        a = self.args
        bsz, seqlen = tokens.shape
        heads, kv_heads, head_dim = a.num_heads, a.num_kv_heads, a.head_dim
        qk_size = (heads + kv_heads) * head_dim
        q_size = heads * head_dim
        rope = self.rope[input_pos]  # [T, 2, D], broadcast over [B, heads, T, D]
        cos, signed_sin = rope[:, 0], rope[:, 1]
        half = head_dim // 2
        one_pos = int(input_pos[0]) if seqlen == 1 and cache_pos is None else None
        slots = input_pos if cache_pos is None else cache_pos
        causal = mask is None and seqlen > 1
        if mask is not None:
            mask = mask[..., :kv_len]
        gqa = heads != kv_heads
        inter = a.intermediate_size
        x = F.embedding(tokens.reshape(-1), self.tok_embeddings.weight)  # [B*T, H], a fresh tensor
        for norm1, wqkv, wo, norm2, w13, w2, k_cache, v_cache in layers:
            qkv = wqkv(norm1(x))
            # Heads as [B, heads, T, D]; RoPE on queries and keys together, in the model's dtype
            # (as transformers rounds it). One token: [B, heads, 1, D] is a plain view, no transpose.
            if one_pos is not None:
                qk = qkv[:, :qk_size].view(bsz, heads + kv_heads, 1, head_dim)
                v = qkv[:, qk_size:].view(bsz, kv_heads, 1, head_dim)
            else:
                qk = qkv[:, :qk_size].view(bsz, seqlen, heads + kv_heads, head_dim).transpose(1, 2)
                v = qkv[:, qk_size:].view(bsz, seqlen, kv_heads, head_dim).transpose(1, 2)
            qk = (qk * cos + qk.roll(half, dims=-1) * signed_sin).to(k_cache.dtype)
            q, k = qk[:, :heads], qk[:, heads:]
            if one_pos is not None:
                k_cache[:, :, one_pos : one_pos + 1].copy_(k)
                v_cache[:, :, one_pos : one_pos + 1].copy_(v)
            else:
                k_cache[:, :, slots] = k
                v_cache[:, :, slots] = v.to(v_cache.dtype)
            y = F.scaled_dot_product_attention(q, k_cache[:, :, :kv_len], v_cache[:, :, :kv_len], attn_mask=mask,
                                               is_causal=causal, enable_gqa=gqa)
            y = y.view(bsz, q_size) if one_pos is not None else y.transpose(1, 2).reshape(bsz * seqlen, q_size)
            x.add_(wo(y.to(x.dtype)))
            gate_up = w13(norm2(x))
            x.add_(w2(F.silu(gate_up[:, :inter]) * gate_up[:, inter:]))
        return head(x).view(bsz, seqlen, -1).float()

    # -- a draft's one-token step ---------------------------------------------------------
    # The streamlined forward still rounds as transformers does (norms and RoPE in the model's dtype,
    # the residual stream too). A draft need not: its step keeps the residual in float32, takes
    # RMSNorm's mean square as one product (eps + x·xᵀ/H) and RoPE as one product with the position's
    # rotation matrix. Batch 1, one token, no mask: about 30 operators a layer instead of 50, a
    # measurable share of a small int4 model's step on a CPU.

    def _build_draft_plan(self) -> tuple:
        dtype = self.dtype
        a = self.args

        def norm_weight(norm: RMSNorm) -> Tensor:
            return norm.weight.detach().float()

        layers = []
        for layer in self.layers:
            attn, ffn = layer.attention, layer.feed_forward
            layers.append((
                norm_weight(layer.attention_norm), _linear_fn(attn.wqkv, dtype), _linear_fn(attn.wo, dtype),
                norm_weight(layer.ffn_norm), _linear_fn(ffn.w13, dtype), _linear_fn(ffn.w2, dtype),
                attn.kv_cache.k_cache, attn.kv_cache.v_cache,
            ))
        d = a.head_dim
        # rotate_half(x) = x @ shift with shift[i, j] = 1 where i = (j + d/2) mod d; the table's sin is signed.
        shift = torch.roll(torch.eye(d, device=self.device), d // 2, dims=1)
        rope = rope_table(a, self.max_len).to(self.device)  # float32
        eps = torch.full((1, 1), float(self.norm.eps), device=self.device)
        return layers, norm_weight(self.norm), _linear_fn(self.output, dtype), shift, rope, eps

    def _draft_step(self, tokens: Tensor, pos: int) -> Tensor:
        """Logits [1, 1, V] of one token at position ``pos`` (batch 1), rounded as a draft may (see above)."""
        if self._draft_plan is None:
            self._draft_plan = self._build_draft_plan()
        layers, final_norm, head, shift, rope, eps = self._draft_plan
        a = self.args
        dtype, heads, kv_heads, d = self.dtype, a.num_heads, a.num_kv_heads, a.head_dim
        qk_size, q_size, inter = (heads + kv_heads) * d, heads * d, a.intermediate_size
        cos, signed_sin = rope[pos]
        rotation = shift * signed_sin  # x @ rotation = rotate_half(x) · sin; plus the diagonal cos
        rotation.diagonal().add_(cos)
        gqa = heads != kv_heads
        x = F.embedding(tokens.view(1), self.tok_embeddings.weight).float()  # [1, H] float32 residual
        inv_h = 1.0 / a.hidden_size

        def norm(x: Tensor, weight: Tensor) -> Tensor:
            return (x * weight).mul_(torch.addmm(eps, x, x.t(), alpha=inv_h).rsqrt_()).to(dtype)

        for w1, wqkv, wo, w2_norm, w13, w2, k_cache, v_cache in layers:
            qkv = wqkv(norm(x, w1))
            qk = qkv[0, :qk_size].view(heads + kv_heads, d).float() @ rotation  # [heads + kv, d]
            k_cache[0, :, pos].copy_(qk[heads:])
            v_cache[0, :, pos].copy_(qkv[0, qk_size:].view(kv_heads, d))
            y = F.scaled_dot_product_attention(qk[:heads].view(1, heads, 1, d), k_cache[:, :, : pos + 1],
                                               v_cache[:, :, : pos + 1], enable_gqa=gqa)
            x.add_(wo(y.view(1, q_size).to(dtype)))
            gate_up = w13(norm(x, w2_norm))
            x.add_(w2(F.silu(gate_up[:, :inter]) * gate_up[:, inter:]))
        return head(norm(x, final_norm)).view(1, 1, -1).float()


def cache_dtype_for(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The KV cache's dtype: float32 on CPU for a 16-bit model, else the model's.

    The cached values are the same (rounded to the model's dtype before they are stored); only
    attention runs in float32, where the CPU's attention kernel is several times faster than in
    bfloat16 for one query. CUDA keeps the model's dtype.
    """
    if device.type == "cpu" and dtype in (torch.bfloat16, torch.float16):
        return torch.float32
    return dtype


def _norm_fn(norm: RMSNorm, dtype: torch.dtype) -> Callable[[Tensor], Tensor]:
    """RMSNorm as a closure; float32: torch's fused op with the weight (equal to weight · norm)."""
    weight, eps, dim = norm.weight, norm.eps, norm.weight.shape[-1]
    if dtype == torch.float32:
        return lambda x: F.rms_norm(x, (dim,), weight, eps)
    return lambda x: weight * F.rms_norm(x.float(), (dim,), eps=eps).to(dtype)


def _linear_fn(module: nn.Module, dtype: torch.dtype) -> Callable[[Tensor], Tensor]:
    """A linear of 2-D inputs as a closure (an Int4Linear's kernel call, or F.linear)."""
    as_function = getattr(module, "as_function", None)
    if as_function is not None:
        return as_function(dtype)
    if type(module) is not nn.Linear:
        return module
    weight, bias = module.weight, module.bias
    if weight.dtype == torch.bfloat16 and weight.device.type == "cpu":
        return lambda x: _bf16_linear_cpu(x, weight, bias)
    return lambda x: F.linear(x, weight, bias)


def _bf16_linear_cpu(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """bfloat16 F.linear on CPU; one or two rows skip oneDNN, whose bfloat16 matrix-vector product
    takes about twice as long as ATen's for the (memory-bound) output layer; both accumulate in float32.

    The switch is process-wide while any thread is in here: another thread's bfloat16 matmul at that
    moment may also run without oneDNN (slower, same results). Entries are counted under a lock, so
    the user's setting comes back when the last one leaves.
    """
    if x.shape[0] > 2 or _set_mkldnn is None:
        return F.linear(x, weight, bias)
    with _without_mkldnn():
        return F.linear(x, weight, bias)


_get_mkldnn = getattr(torch._C, "_get_mkldnn_enabled", None)
_set_mkldnn = getattr(torch._C, "_set_mkldnn_enabled", None) if _get_mkldnn is not None else None
_mkldnn_lock = threading.Lock()
_mkldnn_state = {"users": 0, "saved": True}


@contextlib.contextmanager
def _without_mkldnn() -> Iterator[None]:
    # Only the one switch (torch.backends.mkldnn.flags also resets the TF32 and precision settings).
    with _mkldnn_lock:
        if _mkldnn_state["users"] == 0:
            _mkldnn_state["saved"] = _get_mkldnn()
            _set_mkldnn(False)
        _mkldnn_state["users"] += 1
    try:
        yield
    finally:
        with _mkldnn_lock:
            _mkldnn_state["users"] -= 1
            if _mkldnn_state["users"] == 0:
                _set_mkldnn(_mkldnn_state["saved"])
