"""The draft's shortlist head: int4 ranking, exact rescoring; speculative decoding stays exact with it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from scipy.stats import chi2

from compress.runtime.draft_head import ShortlistHead, rescore_shortlist
from compress.runtime.speculative import ModelDraft, Sampling, generate_runtime
from tests.conftest import make_tiny_model, torch_threads
from tests.test_speculative import (
    PROMPT,
    SAMPLES,
    VOCAB,
    ToyLM,
    _chi_square,
    _exact_continuations,
    _sample_many,
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with torch_threads(1):
        yield


def test_rescore_shortlist_replaces_the_top_candidates():
    g = torch.Generator().manual_seed(0)
    approx, x, weight = torch.randn(3, 50, generator=g), torch.randn(3, 8, generator=g), torch.randn(50, 8, generator=g)
    exact = x @ weight.t()
    out = rescore_shortlist(approx.clone(), x, weight, 5)
    for r in range(3):
        top = set(approx[r].topk(5).indices.tolist())
        for j in range(50):  # slow and obvious: exact on the row's top 5 of approx, approx elsewhere
            torch.testing.assert_close(out[r, j], exact[r, j] if j in top else approx[r, j])
    # One row takes the gather path, several the batched one: same values.
    torch.testing.assert_close(rescore_shortlist(approx[1:2].clone(), x[1:2], weight, 5), out[1:2])
    # A shortlist of the whole vocabulary is the exact head.
    torch.testing.assert_close(rescore_shortlist(approx.clone(), x, weight, 50), exact)


@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_shortlist_head_argmax_is_the_exact_heads(backend):
    """On a head the int4 ranking gets roughly right, the rescored argmax is the exact one."""
    g = torch.Generator().manual_seed(1)
    weight = torch.randn(256, 64, generator=g)
    x = torch.randn(40, 64, generator=g)
    head = ShortlistHead(weight, shortlist=8, backend=backend)
    logits = head(x)
    exact = x @ weight.t()
    assert torch.equal(logits.argmax(-1), exact.argmax(-1))
    top = logits.topk(1, -1).values
    torch.testing.assert_close(top, exact.topk(1, -1).values, rtol=1e-5, atol=1e-5)
    # The closure of the streamlined forward computes the same.
    torch.testing.assert_close(head.as_function(torch.float32)(x), logits)
    with pytest.raises(ValueError):
        ShortlistHead(weight, shortlist=0)


def test_runtime_draft_with_shortlist_head_is_exact():
    """Greedy speculation with an int4 self-draft whose head is a shortlist head: plain greedy output, k 1..8."""
    from tests.test_speculative import int4_records, runtime

    hf = make_tiny_model(layers=2, vocab=256, seed=0)
    target = runtime(hf)
    draft_rt = runtime(hf, int4_records(hf), head="shortlist")
    draft_model = draft_rt.model
    assert isinstance(draft_model.output, ShortlistHead)
    expected = target.generate_ids([PROMPT], 16).tokens[0]
    for k in range(1, 9):
        draft = ModelDraft(draft_model, kv_source=target.model)
        out, stats = generate_runtime(target, draft, draft_rt, PROMPT, 16, k=k)
        assert out == expected, f"k={k}"
    assert stats.accepted > 0


class ShortlistToy(ToyLM):
    """A toy draft whose logits come out of ``rescore_shortlist``: another toy's logits ranked, the best
    one rescored with the target's. Its sampled proposals follow softmax of those logits."""

    def __init__(self, vocab: int, seed: int, exact: ToyLM, shortlist: int = 1):
        super().__init__(vocab, seed)
        self.exact, self.shortlist = exact, shortlist

    def __call__(self, tokens, input_pos):
        approx = super().__call__(tokens, input_pos)[0]
        exact = self.exact(tokens, input_pos)[0]
        rows = [rescore_shortlist(approx[r : r + 1].clone(), torch.ones(1, 1), exact[r][:, None], self.shortlist)
                for r in range(approx.shape[0])]
        return torch.cat(rows)[None]


def test_sampling_with_shortlist_draft_matches_target_distribution():
    sampling = Sampling(temperature=1.0)
    exact = _exact_continuations(ToyLM(VOCAB, seed=0), sampling)
    counts = _sample_many(lambda: ModelDraft(ShortlistToy(VOCAB, 7, ToyLM(VOCAB, seed=0))), sampling, 3)
    stat, df = _chi_square(counts, exact, SAMPLES)
    assert stat < chi2.ppf(0.999, df), f"chi-square {stat:.1f} on {df} degrees of freedom"


def test_loader_rejects_unknown_head():
    from compress.runtime.errors import RuntimeInputError
    from compress.runtime.loader import from_transformers

    with pytest.raises(RuntimeInputError):
        from_transformers(make_tiny_model(layers=1), head="half")


def test_shortlist_head_on_a_float_model_keeps_float32():
    from compress.runtime.loader import from_transformers

    hf = make_tiny_model(layers=1, vocab=256)
    model, _ = from_transformers(hf, head="shortlist")
    assert model.dtype == torch.float32 and isinstance(model.output, ShortlistHead)
    ids = torch.tensor([[1, 2, 3, 4]])
    model.setup_caches(1, 16)
    with torch.inference_mode():
        logits = model(ids, torch.arange(4))
    ref = hf(ids).logits
    assert torch.equal(logits.argmax(-1), ref.argmax(-1))
    assert F.cosine_similarity(logits.flatten(), ref.flatten(), dim=0) > 0.99


@pytest.mark.parametrize("quantized", [False, True])
def test_draft_step_close_to_the_forward(quantized):
    """The draft's one-token step computes the model's logits up to rounding (float32 or int4 + bfloat16)."""
    from compress.quant.int4 import QuantArgs, quantize
    from compress.runtime.loader import from_transformers

    hf = make_tiny_model(layers=2, vocab=256, seed=3)
    records = {name: quantize(mod.weight, QuantArgs(4, 32, True)) for name, mod in hf.named_modules()
               if isinstance(mod, torch.nn.Linear) and "lm_head" not in name} if quantized else None
    dtype = torch.bfloat16 if quantized else torch.float32
    model, _ = from_transformers(hf, records, dtype=dtype)
    model.setup_caches(1, 32)
    seq = [3, 17, 9, 200, 41, 5, 77]
    with torch.inference_mode():
        model(torch.tensor([seq[:4]]), torch.arange(4))
        expected = [model(torch.tensor([[t]]), torch.tensor([4 + i]))[0, -1] for i, t in enumerate(seq[4:])]
        model.setup_caches(1, 32)
        model.draft_steps = True
        model(torch.tensor([seq[:4]]), torch.arange(4))  # a prefill keeps the streamlined forward
        got = [model(torch.tensor([[t]]), torch.tensor([4 + i]))[0, -1] for i, t in enumerate(seq[4:])]
    tol = dict(rtol=3e-2, atol=3e-2) if quantized else dict(rtol=1e-4, atol=1e-4)
    for e, g in zip(expected, got):
        torch.testing.assert_close(g, e, **tol)
