"""Perplexity by the protocol of the GPTQ and AWQ papers (see compress.data)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm


@torch.no_grad()
def window_nll(model: nn.Module, batch: Tensor) -> Tensor:
    """Summed next-token NLL of each window in ``batch`` [b, seq] (float64 [b]).

    The output layer runs one window at a time: a batch's full logits (8 × 512 × 49152 floats for
    SmolLM2, 0.8 GB, and as much again inside the loss) would dominate the job's peak memory.
    """
    decoder, head = _decoder_and_head(model)
    if decoder is None:
        logits = model(input_ids=batch, use_cache=False).logits
        return _nll(logits[:, :-1], batch[:, 1:])
    hidden = decoder(input_ids=batch, use_cache=False).last_hidden_state
    return torch.cat([_nll(head(hidden[i : i + 1, :-1]), batch[i : i + 1, 1:]) for i in range(batch.shape[0])])


def _decoder_and_head(model: nn.Module) -> tuple[nn.Module | None, nn.Module | None]:
    """The decoder stack and output layer of a plain causal LM (Llama, Mistral, Qwen2), else (None, None)."""
    get_decoder = getattr(model, "get_decoder", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    # Models that post-process logits (soft-capping, scaling) must go through their own forward.
    if get_decoder is None or head is None or getattr(model.config, "final_logit_softcapping", None):
        return None, None
    if getattr(model.config, "model_type", "") not in ("llama", "mistral", "qwen2"):
        return None, None
    return get_decoder(), head


def _nll(logits: Tensor, targets: Tensor) -> Tensor:
    shift = logits.float()
    nll = F.cross_entropy(shift.reshape(-1, shift.shape[-1]), targets.reshape(-1), reduction="none")
    return nll.view(targets.shape[0], -1).double().sum(dim=1)


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
