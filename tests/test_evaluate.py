"""Perplexity's memory-saving path (output layer one window at a time) equals the model's own logits."""

import pytest
import torch
import torch.nn.functional as F

from compress import evaluate
from tests.conftest import make_tiny_model


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_window_nll_equals_full_forward(model_type):
    torch.manual_seed(0)
    model = make_tiny_model(model_type)
    batch = torch.randint(0, model.config.vocab_size, (3, 17))
    logits = model(input_ids=batch, use_cache=False).logits[:, :-1]
    ref = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="none")
    ref = ref.view(3, -1).double().sum(dim=1)
    torch.testing.assert_close(evaluate.window_nll(model, batch), ref, rtol=1e-6, atol=1e-5)
    assert evaluate._decoder_and_head(model)[0] is not None  # the chunked path was the one tested
