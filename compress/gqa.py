"""The ``gqa`` stage: convert attention to fewer KV heads, layer by layer.

The math is in :mod:`compress.gqa_math`; this module reads a layer's projections, collects
the attention-input second moment through a hook when the recipe needs calibration, and
writes the converted projections, module attributes and config back.
"""

from __future__ import annotations

import torch
from torch import nn

from compress import gqa_math as M
from compress.arch import head_counts
from compress.calibrate import LayerContext
from compress.recipe import RecipeError


def check_heads(config, num_kv_heads: int) -> None:
    """One-line error unless the model can be converted to ``num_kv_heads``."""
    heads, kv_heads, _ = head_counts(config)
    if num_kv_heads > kv_heads:
        raise RecipeError(
            f"gqa: num_key_value_heads {num_kv_heads} is more than the model's {kv_heads} KV heads"
        )
    if heads % num_kv_heads:
        raise RecipeError(
            f"gqa: num_key_value_heads {num_kv_heads} must divide the {heads} query heads"
        )


def read_attention(attn: nn.Module, kv_heads: int, head_dim: int) -> M.Attention:
    heads = attn.q_proj.weight.shape[0] // head_dim
    return M.Attention(
        q=M.split_heads(M.augment(attn.q_proj.weight.data, attn.q_proj.bias), head_dim),
        k=M.split_heads(M.augment(attn.k_proj.weight.data, attn.k_proj.bias), head_dim),
        v=M.split_heads(M.augment(attn.v_proj.weight.data, attn.v_proj.bias), head_dim),
        o=M.o_heads(attn.o_proj.weight.data, head_dim),
        kv_of=M.kv_of_queries(heads, kv_heads),
    )


def _write_linear(attn: nn.Module, name: str, aug: torch.Tensor) -> None:
    """Replace ``attn.<name>`` by a linear holding ``aug`` (``[out, in + 1]``, last column bias)."""
    old: nn.Linear = getattr(attn, name)
    flat = aug.reshape(-1, aug.shape[-1])
    new = nn.Linear(flat.shape[1] - 1, flat.shape[0], bias=old.bias is not None,
                    device=old.weight.device, dtype=old.weight.dtype)
    new.weight.data.copy_(flat[:, :-1])
    if old.bias is not None:
        new.bias.data.copy_(flat[:, -1])
    new.requires_grad_(old.weight.requires_grad)
    setattr(attn, name, new)


def write_attention(attn: nn.Module, pooled: M.Pooled, num_heads: int) -> None:
    """Put the converted projections into ``attn`` and update what transformers reads."""
    _write_linear(attn, "q_proj", pooled.q)
    _write_linear(attn, "k_proj", pooled.k)
    _write_linear(attn, "v_proj", pooled.v)
    attn.o_proj.weight.data.copy_(M.o_merge(pooled.o))
    num_kv = pooled.k.shape[0]
    attn.num_key_value_groups = num_heads // num_kv
    if hasattr(attn, "num_key_value_heads"):
        attn.num_key_value_heads = num_kv


def set_config_kv_heads(config, num_kv_heads: int) -> None:
    config.num_key_value_heads = num_kv_heads
    text = getattr(config, "text_config", None)
    if text is not None and text is not config and hasattr(text, "num_key_value_heads"):
        text.num_key_value_heads = num_kv_heads


class GQAStage:
    """Pool K/V heads to ``num_kv_heads`` (``mean``, ``fit``, ``fit_q``), grouping contiguously or by similarity."""

    name = "gqa"

    def __init__(self, num_kv_heads: int, pooling: str = "mean", grouping: str = "contiguous",
                 refit_output: bool = True, balance_values: bool = True, value_ridge: float = 0.0):
        if pooling not in M.POOLINGS:
            raise RecipeError(f"gqa: pooling must be one of {', '.join(M.POOLINGS)}")
        if grouping not in M.GROUPINGS:
            raise RecipeError(f"gqa: grouping must be one of {', '.join(M.GROUPINGS)}")
        self.num_kv_heads = num_kv_heads
        self.pooling = pooling
        self.grouping = grouping
        # fit kinds: finish with an o_proj least-squares refit on the layer's real activations
        self.refit_output = refit_output and pooling != "mean"
        # fit kinds: exact change of the value basis so that int4 rounding of v/o_proj is not
        # amplified by cancelling terms (gqa_math.balance_values); mean pooling keeps the model's basis
        self.balance_values = balance_values and pooling != "mean"
        self.value_ridge = value_ridge  # Tikhonov penalty of the value fit (gqa_math.fit_values)
        self.notes: list[str] = []
        self.orders: dict[int, list[int]] = {}
        self._before: int | None = None

    @classmethod
    def from_recipe(cls, entry) -> GQAStage:
        return cls(entry.num_key_value_heads, entry.pooling, entry.grouping,
                   getattr(entry, "refit_output", True), getattr(entry, "balance_values", True),
                   getattr(entry, "value_ridge", 0.0))

    @property
    def needs_calibration(self) -> bool:
        return self.pooling != "mean" or self.grouping != "contiguous"

    def prepare(self, model: nn.Module, arch) -> None:
        check_heads(model.config, self.num_kv_heads)
        self._before = head_counts(model.config)[1]

    def apply_layer(self, ctx: LayerContext) -> None:
        heads, kv_heads, head_dim = head_counts(ctx.config)
        if self._before is None:
            check_heads(ctx.config, self.num_kv_heads)
            self._before = kv_heads
        kv_heads = self._before  # the shared config already says N after layer 0
        attn = ctx.submodule(ctx.arch.attention)
        for norm in ("q_norm", "k_norm"):
            if getattr(attn, norm, None) is not None:
                raise RecipeError(f"gqa: attention with {norm} is not supported")
        if kv_heads == self.num_kv_heads:
            return  # already there: identity
        cov, targets = self._collect(ctx) if self.needs_calibration else (None, [])
        att = read_attention(attn, kv_heads, head_dim)
        rotary = self._rotary(ctx, head_dim)
        pooled, order = M.convert(att, self.num_kv_heads, self.pooling, self.grouping, cov, rotary,
                                 self.value_ridge)
        if order != list(range(heads)):
            self.orders[ctx.index] = order
        write_attention(attn, pooled, heads)
        set_config_kv_heads(ctx.config, self.num_kv_heads)
        if self.refit_output:
            self._refit_output(ctx, attn, targets)
        if self.balance_values:
            self._balance(attn, head_dim, cov)

    def _collect(self, ctx: LayerContext) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """One pass: the attention-input second moment, and (for the o_proj refit) the attention outputs."""
        acc: dict = {"sum": 0, "n": 0}
        targets: list[torch.Tensor] = []

        def on_input(_module, args, _output):
            x = args[0]
            acc["sum"] = acc["sum"] + M.second_moment(x).cpu()
            acc["n"] += x.shape[0] * x.shape[1]

        def on_attention(_module, _args, output):
            targets.append((output[0] if isinstance(output, tuple) else output).detach())

        hooks = {ctx.arch.k_proj: on_input}
        if self.refit_output:
            hooks[ctx.arch.attention] = on_attention
        ctx.forward(hooks, keep_outputs=False)
        return acc["sum"] / max(int(acc["n"]), 1), targets

    def _refit_output(self, ctx: LayerContext, attn: nn.Module, targets: list[torch.Tensor]) -> None:
        o_proj: nn.Linear = attn.o_proj
        bias = o_proj.bias.detach().double() if o_proj.bias is not None else None
        acc: dict = {"gram": 0, "cross": 0, "batch": 0}

        def on_o_input(_module, args, _output):
            a = args[0].reshape(-1, args[0].shape[-1]).double()
            y = targets[acc["batch"]].reshape(a.shape[0], -1).double()
            if bias is not None:
                y = y - bias
            acc["gram"] = acc["gram"] + (a.T @ a).cpu()
            acc["cross"] = acc["cross"] + (y.T @ a).cpu()
            acc["batch"] += 1

        ctx.forward({ctx.arch.o_proj: on_o_input}, keep_outputs=False)
        new = M.refit_output(acc["gram"], acc["cross"], o_proj.weight.detach().cpu())
        o_proj.weight.data.copy_(new.to(o_proj.weight.dtype))

    def _balance(self, attn: nn.Module, head_dim: int, cov: torch.Tensor) -> None:
        """Re-express v_proj rows and o_proj columns in the balanced value basis (output unchanged)."""
        att = read_attention(attn, self.num_kv_heads, head_dim)
        pooled = M.balance_pooled(M.Pooled(att.q, att.k, att.v, att.o), cov.double())
        _write_linear(attn, "v_proj", pooled.v)
        attn.o_proj.weight.data.copy_(M.o_merge(pooled.o).to(attn.o_proj.weight.dtype))

    def _rotary(self, ctx: LayerContext, head_dim: int) -> M.Rotary | None:
        """The model's RoPE frequencies over the calibration window length."""
        if self.pooling == "mean":
            return None
        seq_len = ctx.inputs.hidden[0].shape[1]
        inv_freq = None
        if ctx.model is not None:
            try:
                inv_freq = ctx.model.get_submodule(ctx.arch.rotary_path).inv_freq
            except AttributeError:
                inv_freq = None
        if inv_freq is None or inv_freq.numel() != head_dim // 2:
            params = getattr(ctx.config, "rope_parameters", None) or {}
            theta = params.get("rope_theta", getattr(ctx.config, "rope_theta", 10000.0))
            return M.Rotary.default(head_dim, float(theta), seq_len)
        return M.Rotary.from_inv_freq(inv_freq.detach().cpu(), seq_len)

    def finish(self, model: nn.Module, arch, final) -> None:
        before = self._before or head_counts(model.config)[1]
        set_config_kv_heads(model.config, self.num_kv_heads)
        self.notes.append(
            f"gqa: {before} → {self.num_kv_heads} KV heads (pooling {self.pooling}, grouping {self.grouping}"
            f"{', o_proj refit on activations' if self.refit_output else ''}"
            f"{', v/o balanced' if self.balance_values else ''}); "
            f"KV cache ×{self.num_kv_heads / before:.3g}"
        )
        if self.orders:
            self.notes.append(f"gqa: query heads regrouped in {len(self.orders)} layer(s)")

    # -- resume (compress/resume.py) ---------------------------------------------

    def resume_state(self) -> dict:
        return {"orders": {str(i): order for i, order in self.orders.items()}}

    def load_resume_state(self, state: dict) -> None:
        self.orders = {int(i): list(order) for i, order in state["orders"].items()}

    def restore_layer(self, model: nn.Module, layer: nn.Module, index: int) -> None:
        """A resumed layer got its pooled tensors back: restore what tensors do not carry."""
        from compress.arch import arch_for

        attn = layer.get_submodule(arch_for(model).attention)
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            linear = getattr(attn, name)
            linear.out_features, linear.in_features = linear.weight.shape
        heads, _, head_dim = head_counts(model.config)
        num_kv = attn.k_proj.weight.shape[0] // head_dim
        if num_kv == self.num_kv_heads:
            attn.num_key_value_groups = heads // num_kv
            if hasattr(attn, "num_key_value_heads"):
                attn.num_key_value_heads = num_kv
            set_config_kv_heads(model.config, num_kv)
