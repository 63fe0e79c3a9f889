"""Perplexity by the protocol of the GPTQ and AWQ papers (see compress.data)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm


@torch.no_grad()
def window_nll(model: nn.Module, batch: Tensor) -> Tensor:
    """Summed next-token NLL of each window in ``batch`` [b, seq] (float64 [b])."""
    logits = model(input_ids=batch, use_cache=False).logits
    shift = logits[:, :-1].float()
    targets = batch[:, 1:]
    nll = F.cross_entropy(shift.reshape(-1, shift.shape[-1]), targets.reshape(-1), reduction="none")
    return nll.view(batch.shape[0], -1).double().sum(dim=1)


@torch.no_grad()
def perplexity(
    model: nn.Module,
    windows: Tensor,
    batch_size: int = 8,
    device: torch.device | str | None = None,
    progress: bool = True,
    desc: str = "perplexity",
) -> dict:
    """exp(mean token NLL) over non-overlapping windows [n, seq_len]."""
    device = device or next(model.parameters()).device
    total = 0.0
    tokens = 0
    bar = tqdm(total=windows.shape[0], desc=desc, disable=not progress, unit="window")
    for start in range(0, windows.shape[0], batch_size):
        batch = windows[start : start + batch_size].to(device)
        total += window_nll(model, batch).sum().item()
        tokens += batch.shape[0] * (batch.shape[1] - 1)
        bar.update(batch.shape[0])
    bar.close()
    mean = total / tokens
    return {
        "perplexity": math.exp(mean),
        "mean_nll": mean,
        "windows": int(windows.shape[0]),
        "seq_len": int(windows.shape[1]),
        "tokens_scored": tokens,
    }
