"""A cheap output layer for a speculative draft: rank the vocabulary on int4 weights, rescore the best.

A small model's output layer is a large share of its bytes (SmolLM2-135M: 49152 x 576, a fifth of
its weights; in a draft whose body is int4, the bfloat16 head is nearly as many bytes as the whole
body), and a decode step on a CPU is bound by the bytes it reads. An int4 head reads a quarter of
them but picks a different argmax more often (the draft then agrees less often with its target).
``ShortlistHead`` gets both: int4 logits for the whole vocabulary, then the ``shortlist`` best of
them recomputed on the exact weights. The draft's greedy choice is then the exact head's whenever
that token is among the int4 head's top candidates (measured on SmolLM2: always, for 16).

Any draft keeps speculative decoding exact; the draft's distribution (for sampling) is the softmax
of these logits, a proper distribution over the whole vocabulary.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from compress.quant.int4 import QuantArgs, quantize
from compress.runtime.int4_linear import Int4Linear

DEFAULT_SHORTLIST = 16
# Round to nearest, group 128, symmetric: the head only ranks candidates, so its smallest int4
# layout will do (rescoring 16 candidates recovers the exact head's argmax; see the module note).
SHORTLIST_QUANT = QuantArgs(bits=4, group_size=128, symmetric=True)


def rescore_shortlist(approx: Tensor, x: Tensor, weight: Tensor, shortlist: int) -> Tensor:
    """``approx`` [R, V] with each row's ``shortlist`` largest entries replaced by ``x @ weight.T`` there.

    x [R, H], weight [V, H]. Written in place into ``approx`` and returned. Rows are few (a draft
    step has one), so the exact logits of the candidates are a gather and a small product.
    """
    shortlist = min(shortlist, approx.shape[-1])
    idx = approx.topk(shortlist, dim=-1, sorted=False).indices  # [R, m]
    if x.shape[0] == 1:
        exact = F.linear(x, weight.index_select(0, idx[0]))  # [1, m]
    else:
        exact = torch.bmm(weight[idx], x.unsqueeze(-1)).squeeze(-1)  # [R, m, H] @ [R, H, 1]
    return approx.scatter_(-1, idx, exact.to(approx.dtype))


class ShortlistHead(nn.Module):
    """Output layer: int4 logits for every token, the ``shortlist`` best recomputed on ``weight``.

    ``weight`` [V, H] stays as given (e.g. shared with a tied embedding); the int4 copy is built from it.
    """

    def __init__(self, weight: Tensor, shortlist: int = DEFAULT_SHORTLIST, backend: str = "auto"):
        super().__init__()
        if shortlist < 1:
            raise ValueError("shortlist must be >= 1")
        self.weight = weight
        self.out_features, self.in_features = weight.shape
        self.shortlist = shortlist
        self.approx = Int4Linear(quantize(weight.detach().float().cpu(), SHORTLIST_QUANT), None, backend=backend,
                                 device=weight.device, dtype=weight.dtype)

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).to(self.weight.dtype)
        y = rescore_shortlist(self.approx(x2), x2, self.weight, self.shortlist)
        return y.view(*shape[:-1], self.out_features)

    def as_function(self, dtype: torch.dtype) -> Callable[[Tensor], Tensor]:
        """The forward of 2-D inputs of ``dtype`` as a closure (the runtime's streamlined forward takes these)."""
        approx, weight, shortlist = self.approx.as_function(self.weight.dtype), self.weight, self.shortlist
        if dtype == weight.dtype:
            return lambda x: rescore_shortlist(approx(x), x, weight, shortlist)

        def head(x: Tensor) -> Tensor:
            x = x.to(weight.dtype)
            return rescore_shortlist(approx(x), x, weight, shortlist)

        return head

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, int4 ranking, {self.shortlist} rescored"
