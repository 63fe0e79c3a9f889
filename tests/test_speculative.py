"""Speculative decoding: exact greedy output, exact sampled distribution, consistent caches."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from scipy.stats import chi2

from compress.runtime.speculative import (
    ModelDraft,
    PromptLookupDraft,
    Sampling,
    next_k,
    plain_generate,
    probabilities,
    prompt_lookup,
    residual_distribution,
    speculative_generate,
    verify,
    verify_greedy,
)
from tests.conftest import make_tiny_model, torch_threads

POISON = -1


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Thousands of tiny forward passes: with the cores shared, a second thread only adds waiting."""
    with torch_threads(1):
        yield


class ToyLM:
    """A step with a position-indexed token cache: logits depend on the tokens at t-1 and t.

    Unwritten positions hold POISON, and reading one fails, so a speculative loop that reads a
    position it has not (re)written is caught; stale tokens after a rejection are read only if
    the loop forgets to overwrite them, which the distribution and recompute tests would see.
    """

    def __init__(self, vocab: int, seed: int, max_len: int = 64, scale: float = 1.5):
        g = torch.Generator().manual_seed(seed)
        self.vocab = vocab
        self.table = torch.randn(vocab, vocab, vocab, generator=g) * scale
        self.cache = torch.full((max_len,), POISON, dtype=torch.long)

    def next_logits(self, prev: int, cur: int) -> torch.Tensor:
        return self.table[prev, cur]

    def __call__(self, tokens: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        self.cache[input_pos] = tokens[0]
        prev_pos = (input_pos - 1).clamp_min(0)
        prev = torch.where(input_pos > 0, self.cache[prev_pos], torch.zeros_like(input_pos))
        cur = self.cache[input_pos]
        assert (prev >= 0).all() and (cur >= 0).all(), "read an unwritten cache position"
        return self.table[prev, cur][None]

    def fresh_next_logits(self, tokens: list[int]) -> torch.Tensor:
        prev = tokens[-2] if len(tokens) > 1 else 0
        return self.table[prev, tokens[-1]]


class RecomputeStep:
    """A transformers model behind the step protocol: a position-indexed token buffer, recomputed.

    Writing the buffer at ``input_pos`` and running the model on positions 0..max(input_pos)
    is exactly what a static KV cache computes; stale positions past that are never seen.
    """

    def __init__(self, model, max_len: int = 256):
        self.model = model
        self.buffer = torch.full((max_len,), POISON, dtype=torch.long)

    def __call__(self, tokens: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        self.buffer[input_pos] = tokens[0]
        end = int(input_pos.max()) + 1
        ids = self.buffer[:end]
        assert (ids >= 0).all(), "read an unwritten cache position"
        return self.model(ids[None]).logits[:, input_pos]


class RandomDraft:
    """A deliberately bad draft: uniform random tokens (q uniform, so sampling stays exact)."""

    def __init__(self, vocab: int, seed: int = 0):
        self.vocab = vocab
        self.g = torch.Generator().manual_seed(seed)
        self.passes = 0

    def propose(self, tokens, k, sampling, generator):
        # Drawn with the caller's generator when sampling, so the tokens really follow q.
        out = torch.randint(0, self.vocab, (k,), generator=generator or self.g).tolist()
        return out, torch.full((k, self.vocab), 1.0 / self.vocab)

    def keep(self, valid):
        pass


# --------------------------------------------------------------------------- pure functions


def test_verify_greedy_counts_matching_prefix():
    logits = torch.tensor([3, 5, 7, 9])  # the target's argmax at each position
    assert verify_greedy(torch.tensor([3, 5, 7]), logits) == (3, 9)  # all accepted: bonus
    assert verify_greedy(torch.tensor([3, 4, 7]), logits) == (1, 5)  # correction at the first miss
    assert verify_greedy(torch.tensor([0, 5, 7]), logits) == (0, 3)
    assert verify_greedy(torch.tensor([], dtype=torch.long), logits[:1]) == (0, 3)


def test_residual_distribution():
    p = torch.tensor([0.5, 0.3, 0.2, 0.0])
    q = torch.tensor([0.2, 0.5, 0.1, 0.2])
    torch.testing.assert_close(residual_distribution(p, q), torch.tensor([0.75, 0.0, 0.25, 0.0]))
    torch.testing.assert_close(residual_distribution(p, p), p)  # rejection impossible: fall back to p


@pytest.mark.parametrize("point_mass", [False, True])
def test_verify_first_token_follows_target(point_mass):
    """One draft token then verify: the produced token is distributed as p, whatever q is."""
    g = torch.Generator().manual_seed(0)
    vocab, n = 5, 8000
    p = torch.softmax(torch.randn(vocab, generator=g) * 1.5, 0)
    q = torch.softmax(torch.randn(vocab, generator=g) * 1.5, 0)
    target = torch.stack([p, torch.full((vocab,), 1.0 / vocab)])
    counts = torch.zeros(vocab)
    for _ in range(n):
        x = int(torch.multinomial(q, 1, generator=g))
        accepted, nxt = verify(torch.tensor([x]), None if point_mass else q[None], target, g)
        counts[x if accepted else nxt] += 1
    tv = 0.5 * (counts / n - p).abs().sum()
    assert tv < 0.02, f"total variation {tv:.4f}"


def test_probabilities_greedy_top_k_top_p():
    logits = torch.tensor([1.0, 3.0, 2.0, 0.0])
    assert probabilities(logits, Sampling()).tolist() == [0.0, 1.0, 0.0, 0.0]
    pk = probabilities(logits, Sampling(temperature=1.0, top_k=2))
    assert (pk[[0, 3]] == 0).all() and abs(float(pk.sum()) - 1) < 1e-6
    full = torch.softmax(logits, 0)  # ~[0.087, 0.644, 0.237, 0.032]
    pp = probabilities(logits, Sampling(temperature=1.0, top_p=0.8))
    expected = torch.tensor([0.0, full[1], full[2], 0.0])
    torch.testing.assert_close(pp, expected / expected.sum())


def test_prompt_lookup():
    text = [1, 2, 3, 4, 5, 9, 1, 2, 3, 7, 8, 1, 2, 3]
    assert prompt_lookup(text, 3) == [7, 8, 1]  # the latest earlier "1 2 3" is followed by 7 8 1
    assert prompt_lookup(text, 10, max_ngram=3) == [7, 8, 1, 2, 3]
    assert prompt_lookup([5, 6, 7, 8], 4) == []  # no earlier occurrence
    assert prompt_lookup([4, 1, 2, 9, 2], 2) == [9, 2]  # falls back to a 1-gram
    assert prompt_lookup([4, 1, 2, 9, 2], 2, min_ngram=2) == []
    assert prompt_lookup([3], 4) == []


def test_next_k_adaptive():
    assert next_k(4, 4, 4, 1, 8) == 5
    assert next_k(8, 8, 8, 1, 8) == 8
    assert next_k(4, 4, 2, 1, 8) == 3
    assert next_k(1, 1, 0, 1, 8) == 1
    assert next_k(4, 0, 0, 1, 8) == 4  # nothing proposed (lookup found no match): unchanged


# --------------------------------------------------------------------------- greedy: exact output


@pytest.fixture(scope="module")
def tiny_pair():
    target = make_tiny_model(layers=2, vocab=64, seed=0)
    # An unrelated checkpoint with the same vocabulary.
    other = make_tiny_model(layers=1, hidden=32, intermediate=64, vocab=64, seed=1)
    # A draft built from the target: its weights fake-quantized to int4 (group 32).
    from compress.quant.int4 import QuantArgs, fake_quantize

    self_draft = copy.deepcopy(target)
    with torch.no_grad():
        for name, mod in self_draft.named_modules():
            if isinstance(mod, torch.nn.Linear) and "lm_head" not in name:
                mod.weight.copy_(fake_quantize(mod.weight, QuantArgs(4, 32, True)))
    return target, other, self_draft


def _drafts(tiny_pair):
    _, other, self_draft = tiny_pair
    return {
        "other-checkpoint": lambda: ModelDraft(RecomputeStep(other)),
        "int4-self-draft": lambda: ModelDraft(RecomputeStep(self_draft)),
        "prompt-lookup": lambda: PromptLookupDraft(),
        "random": lambda: RandomDraft(64, seed=3),
    }


PROMPT = [5, 9, 17, 3, 5, 9, 17, 3, 40, 41, 5, 9]


def test_plain_generate_matches_reference_greedy(tiny_pair):
    target = tiny_pair[0]
    ids = torch.tensor([PROMPT])
    for _ in range(10):
        ids = torch.cat([ids, target(ids).logits[:, -1].argmax(-1, keepdim=True)], 1)
    out, stats = plain_generate(RecomputeStep(target), PROMPT, 10)
    assert out == ids[0, len(PROMPT) :].tolist()
    assert stats.target_passes == 9 and stats.tokens_per_pass == 1.0


@pytest.mark.parametrize("kind", ["other-checkpoint", "int4-self-draft", "prompt-lookup", "random"])
def test_greedy_speculative_equals_plain(tiny_pair, kind):
    target = tiny_pair[0]
    make = _drafts(tiny_pair)[kind]
    expected, _ = plain_generate(RecomputeStep(target), PROMPT, 12)
    # k = 1..8 for every kind runs on the runtime's cached model below; here the recompute oracle.
    for k, adaptive in [(1, False), (3, False), (8, False), (2, True)]:
        out, stats = speculative_generate(RecomputeStep(target), make(), PROMPT, 12, k=k, adaptive=adaptive)
        assert out == expected, f"{kind}, k={k}, adaptive={adaptive}"
        assert stats.new_tokens == 12 and stats.target_passes <= 11
        assert max(stats.k_history) <= (2 * k if adaptive else k)


def test_self_draft_beats_random_draft(tiny_pair):
    target = tiny_pair[0]
    _, good = speculative_generate(RecomputeStep(target), _drafts(tiny_pair)["int4-self-draft"](), PROMPT, 16, k=4)
    _, bad = speculative_generate(RecomputeStep(target), RandomDraft(64, 3), PROMPT, 16, k=4)
    assert good.acceptance_rate > 0.5 > bad.acceptance_rate
    assert good.tokens_per_pass > bad.tokens_per_pass


def test_stop_token_and_cache_limit(tiny_pair):
    target = tiny_pair[0]
    expected, _ = plain_generate(RecomputeStep(target), PROMPT, 20)
    stop = expected[7]
    first = expected.index(stop)
    out, _ = speculative_generate(RecomputeStep(target), PromptLookupDraft(), PROMPT, 20, k=5, stop_tokens={stop})
    assert out == expected[: first + 1]
    # The caches hold 20 positions: generation stops there and never writes past it.
    out, _ = speculative_generate(RecomputeStep(target, 20), RandomDraft(64), PROMPT, 20, k=6, max_seq_len=20)
    assert out == expected[: 20 - len(PROMPT)]


# --------------------------------------------------------------------------- sampling: exact distribution

VOCAB, NEW, SAMPLES = 3, 3, 1500
TOY_PROMPT = [0, 1, 2, 0, 1]


def _exact_continuations(target: ToyLM, sampling: Sampling) -> dict[tuple[int, ...], float]:
    """P(x1..xNEW | prompt) by enumeration."""
    dist = {}
    for cont in itertools.product(range(VOCAB), repeat=NEW):
        seq, prob = list(TOY_PROMPT), 1.0
        for x in cont:
            prob *= float(probabilities(target.fresh_next_logits(seq), sampling)[x])
            seq.append(x)
        dist[cont] = prob
    return dist


def _chi_square(counts: dict, exact: dict, n: int) -> tuple[float, int]:
    """Pearson's statistic, cells with expected count < 5 pooled into one."""
    stat, df, pooled_o, pooled_e = 0.0, -1, 0.0, 0.0
    for cont, p in exact.items():
        o, e = counts.get(cont, 0), n * p
        if e < 5:
            pooled_o, pooled_e = pooled_o + o, pooled_e + e
            continue
        stat += (o - e) ** 2 / e
        df += 1
    if pooled_e > 0:
        stat += (pooled_o - pooled_e) ** 2 / pooled_e
        df += 1
    return stat, df


def _sample_many(make_draft, sampling: Sampling, k: int, adaptive: bool = False) -> dict:
    target = ToyLM(VOCAB, seed=0)
    g = torch.Generator().manual_seed(1234)
    counts: dict = {}
    for _ in range(SAMPLES):
        out, _ = speculative_generate(target, make_draft(), TOY_PROMPT, NEW, k=k, sampling=sampling, generator=g,
                                      adaptive=adaptive)
        counts[tuple(out)] = counts.get(tuple(out), 0) + 1
    return counts


@pytest.mark.parametrize(
    "draft_kind,sampling,k,adaptive",
    [
        ("model", Sampling(temperature=0.7, top_k=3), 3, True),
        ("prompt-lookup", Sampling(temperature=1.0), 2, False),
        ("random", Sampling(temperature=1.0), 1, False),
    ],
)
def test_sampling_matches_target_distribution(draft_kind, sampling, k, adaptive):
    make = {
        "model": lambda: ModelDraft(ToyLM(VOCAB, seed=7)),
        "prompt-lookup": lambda: PromptLookupDraft(),
        "random": lambda: RandomDraft(VOCAB, seed=5),
    }[draft_kind]
    exact = _exact_continuations(ToyLM(VOCAB, seed=0), sampling)
    counts = _sample_many(make, sampling, k, adaptive)
    stat, df = _chi_square(counts, exact, SAMPLES)
    assert stat < chi2.ppf(0.999, df), f"chi-square {stat:.1f} on {df} degrees of freedom"


def test_chi_square_catches_a_wrong_rule(monkeypatch):
    """The distribution test has power: accepting every draft token (sampling the draft) fails it."""
    import compress.runtime.speculative as spec

    def accept_all(draft_tokens, draft_probs, target_probs, generator=None):
        k = draft_tokens.numel()
        return k, spec.sample(target_probs[k], generator)

    monkeypatch.setattr(spec, "verify", accept_all)
    sampling = Sampling(temperature=1.0)
    exact = _exact_continuations(ToyLM(VOCAB, seed=0), sampling)
    counts = _sample_many(lambda: ModelDraft(ToyLM(VOCAB, seed=7)), sampling, 2)
    stat, df = _chi_square(counts, exact, SAMPLES)
    assert stat > chi2.ppf(0.999, df)


# --------------------------------------------------------------------------- caches after rejections


@pytest.mark.parametrize("k", [1, 3, 8])
def test_caches_consistent_after_rejections(k):
    """After a run full of rejections, the next step's logits equal a fresh computation."""
    target, draft_model = ToyLM(6, seed=0, max_len=128), ToyLM(6, seed=9, max_len=128)
    draft = ModelDraft(draft_model)
    g = torch.Generator().manual_seed(0)
    prompt = [0, 1, 2, 3]
    out, stats = speculative_generate(target, draft, prompt, 40, k=k, sampling=Sampling(temperature=1.0), generator=g)
    assert stats.accepted < stats.proposed  # there were rejections
    seq = prompt + out
    pos = torch.tensor([len(seq) - 1])
    torch.testing.assert_close(target(torch.tensor([[seq[-1]]]), pos)[0, -1], target.fresh_next_logits(seq))
    # The draft's valid prefix holds exactly the final tokens.
    assert draft_model.cache[: draft.valid].tolist() == seq[: draft.valid]
    rest = torch.arange(draft.valid, len(seq))  # what the draft's next propose would feed
    logits = draft_model(torch.tensor([seq[draft.valid :]]), rest)[0, -1]
    torch.testing.assert_close(logits, draft_model.fresh_next_logits(seq))


# --------------------------------------------------------------------------- on the runtime's static-cache model


def runtime(hf_model, records=None, **kwargs):
    """A runtime (model + generation) of a transformers model, with int4 ``records`` for some linears."""
    from compress.runtime.generate import Runtime
    from compress.runtime.loader import from_transformers

    model, info = from_transformers(hf_model, records, **kwargs)
    return Runtime(model, None, info)


def int4_records(hf_model) -> dict:
    """RTN w4 g32 records of every linear but the output layer: the tests' int4 self-draft."""
    from compress.quant.int4 import QuantArgs, quantize

    return {name: quantize(mod.weight, QuantArgs(4, 32, True)) for name, mod in hf_model.named_modules()
            if isinstance(mod, torch.nn.Linear) and "lm_head" not in name}


def build_runtime_models():
    """Target (float), its int4 self-draft and an unrelated draft, as runtime models."""
    hf = make_tiny_model(layers=2, vocab=64, seed=0)
    target = runtime(hf)
    self_draft = runtime(hf, int4_records(hf), backend="reference")
    other = runtime(make_tiny_model(layers=1, hidden=32, intermediate=64, vocab=64, seed=1))
    return target, self_draft, other


@pytest.fixture(scope="module")
def runtime_models():
    return build_runtime_models()


def test_runtime_greedy_equals_plain(runtime_models):
    from compress.runtime.speculative import generate_runtime

    target, self_draft, other = runtime_models
    expected = target.generate_ids([PROMPT], 16).tokens[0]
    kinds = {
        "int4-self-draft": lambda: (ModelDraft(self_draft.model), self_draft),
        "int4-self-draft, target's KV": lambda: (ModelDraft(self_draft.model, kv_source=target.model), self_draft),
        "other-checkpoint": lambda: (ModelDraft(other.model), other),
        "prompt-lookup": lambda: (PromptLookupDraft(), None),
        "random": lambda: (RandomDraft(64, seed=2), None),
    }
    for kind, make in kinds.items():
        for k in range(1, 9):
            draft, draft_rt = make()
            out, stats = generate_runtime(target, draft, draft_rt, PROMPT, 16, k=k, adaptive=k == 3)
            assert out == expected, f"{kind}, k={k}"
    _, stats = generate_runtime(target, ModelDraft(self_draft.model), self_draft, PROMPT, 16, k=4)
    assert stats.acceptance_rate > 0.5


def test_draft_takes_the_targets_kv(runtime_models):
    """A self-draft copies the prompt's and the accepted tokens' keys and values from the target."""
    from compress.runtime.speculative import copy_kv, generate_runtime, kv_compatible

    target, self_draft, other = runtime_models
    assert kv_compatible(target.model, self_draft.model) and not kv_compatible(target.model, other.model)
    draft = ModelDraft(self_draft.model, kv_source=target.model)
    out, stats = generate_runtime(target, draft, self_draft, PROMPT, 16, k=3)
    assert out == target.generate_ids([PROMPT], 16).tokens[0]
    # The prompt is copied, never fed: the draft's first pass is the one token after it.
    assert draft.copied >= len(PROMPT) and stats.draft_passes < stats.target_passes * 3 + 1
    # copy_kv copies exactly the positions asked for.
    target.model.setup_caches(1, 32)
    self_draft.model.setup_caches(1, 32)
    with torch.inference_mode():
        target.model(torch.tensor([PROMPT]), torch.arange(len(PROMPT)))
    copy_kv(target.model, self_draft.model, 2, 5)
    for t_layer, d_layer in zip(target.model.layers, self_draft.model.layers):
        t_k, d_k = t_layer.attention.kv_cache.k_cache, d_layer.attention.kv_cache.k_cache
        torch.testing.assert_close(d_k[:, :, 2:5], t_k[:, :, 2:5].to(d_k.dtype))
        assert not d_k[:, :, :2].any() and not d_k[:, :, 5:].any()


@pytest.mark.parametrize("k", [2, 7])
def test_runtime_caches_consistent_after_rejections(runtime_models, k):
    """After sampled speculation with many rejections, each cache gives a fresh prefill's logits."""
    from compress.runtime.speculative import generate_runtime

    target, _, other = runtime_models
    draft = ModelDraft(other.model)
    out, stats = generate_runtime(target, draft, other, PROMPT, 30, k=k, sampling=Sampling(temperature=1.0), seed=1)
    assert 0 < stats.accepted < stats.proposed
    seq = PROMPT + out
    with torch.inference_mode():
        # Continue on the caches left by speculation, then recompute from scratch on a fresh cache.
        cached = target.model(torch.tensor([seq[-1:]]), torch.tensor([len(seq) - 1]))[0, -1]
        draft_cached = other.model(torch.tensor([seq[draft.valid :]]), torch.arange(draft.valid, len(seq)))[0, -1]
        target.model.setup_caches(1, 128)
        fresh = target.model(torch.tensor([seq]), torch.arange(len(seq)))[0, -1]
        other.model.setup_caches(1, 128)
        draft_fresh = other.model(torch.tensor([seq]), torch.arange(len(seq)))[0, -1]
    torch.testing.assert_close(cached, fresh, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(draft_cached, draft_fresh, atol=1e-4, rtol=1e-4)


# --------------------------------------------------------------------------- drafts by dropping layers


def test_block_influence_and_choice():
    from compress.drop_layers import block_influence, choose_layers

    h = torch.randn(2, 5, 8)
    assert abs(block_influence(h, h)) < 1e-6
    assert abs(block_influence(h, 3 * h) - 0.0) < 1e-6  # scale does not turn the residual stream
    assert abs(block_influence(h, -h) - 2.0) < 1e-6
    assert choose_layers([0.1, 0.5, 0.05, 0.3], 2) == [1, 3]
    assert choose_layers([0.2, 0.2, 0.2], 2) == [0, 1]


def test_remove_layers_equals_a_model_built_with_those_layers():
    from compress.arch import arch_for
    from compress.drop_layers import remove_layers, rename_keys

    model = make_tiny_model(layers=4, vocab=64, seed=0)
    kept = [0, 2]
    reference = make_tiny_model(layers=2, vocab=64, seed=5)
    state = rename_keys(model.state_dict(), "model.layers", {0: 0, 2: 1})
    reference.load_state_dict(state)
    mapping = remove_layers(model, arch_for(model), kept)
    assert mapping == {0: 0, 2: 1} and model.config.num_hidden_layers == 2
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(model(ids).logits, reference(ids).logits)


def test_drop_layers_stage_with_quantizer():
    """Scored on calibration windows, dropped in finish; the quantizer's records follow the renumbering."""
    from compress.arch import arch_for
    from compress.calibrate import run_layerwise
    from compress.drop_layers import DropLayersStage
    from compress.quant.int4 import QuantArgs
    from compress.quant.rtn import RTNStage

    model = make_tiny_model(layers=4, vocab=64, seed=0)
    arch = arch_for(model)
    windows = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    drop, rtn = DropLayersStage(keep=3), RTNStage(QuantArgs(4, 32, True), ["lm_head"])
    final = run_layerwise(model, arch, windows, [drop, rtn], "cpu", 2, progress=False)
    drop.finish(model, arch, final)
    assert len(model.model.layers) == 3 and len(drop.scores) == 4
    dropped = next(i for i in range(4) if i not in drop.mapping)
    assert drop.scores[dropped] == min(drop.scores.values())
    records = drop.rename_quantized(rtn.quantized)
    assert len(records) == 3 * len(arch.linears)
    for name, qw in records.items():
        torch.testing.assert_close(model.get_submodule(name).weight, qw.dequantize(torch.float32))
    model(windows)  # still runs
    again = DropLayersStage(keep=3)
    again.load_resume_state(drop.resume_state())
    assert again.scores == pytest.approx(drop.scores)


# --------------------------------------------------------------------------- packed linears of the verify pass


@pytest.mark.skipif(not __import__("compress.runtime.speculative", fromlist=["x"]).packed_linear_available(),
                    reason="no oneDNN in this torch build")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
def test_packed_linear_equals_linear(dtype, bias):
    from compress.runtime.speculative import PACKED_MAX_ROWS, PackedLinear

    torch.manual_seed(0)
    linear = torch.nn.Linear(48, 80, bias=bias).to(dtype)
    packed = PackedLinear(linear, rows=5)
    fn = packed.as_function(dtype)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    with torch.inference_mode():
        for rows in [1, 2, 5, 9, PACKED_MAX_ROWS, PACKED_MAX_ROWS + 1, 40]:
            x = torch.randn(1, rows, 48).to(dtype)
            expected = torch.nn.functional.linear(x, linear.weight, linear.bias)
            for got in (packed(x), fn(x[0])[None]):
                assert got.shape == expected.shape and got.dtype == dtype
                if rows == 1 or rows > PACKED_MAX_ROWS:  # plain decoding and prefill: the very same kernel
                    assert torch.equal(got, expected)
                else:
                    torch.testing.assert_close(got, expected, **tol)


@pytest.mark.skipif(not __import__("compress.runtime.speculative", fromlist=["x"]).packed_linear_available(),
                    reason="no oneDNN in this torch build")
def test_pack_for_verification_swaps_float_linears_once():
    from compress.quant.int4 import QuantArgs, quantize
    from compress.runtime.loader import from_transformers
    from compress.runtime.speculative import PackedLinear, pack_for_verification

    hf = make_tiny_model(layers=2, vocab=64, seed=0)
    model, _ = from_transformers(hf)
    model.setup_caches(1, 64)
    ids, pos = torch.tensor([PROMPT]), torch.arange(len(PROMPT))
    with torch.inference_mode():
        before = model(ids, pos)
        assert pack_for_verification(model, 5) == 4 * 2 + 1  # four linears a layer, and the head
        assert pack_for_verification(model, 5) == 0  # already packed for 5 rows
        assert pack_for_verification(model, 3) == 9  # repacked for another verify length
        assert isinstance(model.output, PackedLinear)
        assert model.output.weight is model.tok_embeddings.weight or not hf.config.tie_word_embeddings
        model.setup_caches(1, 64)
        # A prefill keeps F.linear for long inputs; 12 rows go through the packed weights.
        torch.testing.assert_close(model(ids, pos), before, atol=1e-5, rtol=1e-5)
    records = {name: quantize(mod.weight, QuantArgs(4, 32, True)) for name, mod in hf.named_modules()
               if isinstance(mod, torch.nn.Linear) and "lm_head" not in name}
    int4_model, _ = from_transformers(hf, records, backend="reference")
    assert pack_for_verification(int4_model, 5) == 1  # only the float head


# --------------------------------------------------------------------------- compress generate --draft


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A tiny random float model folder with the embedded model's tokenizer (its vocabulary size)."""
    import shutil

    from compress import assets

    tokenizer_dir = assets.cache_dir() / assets.EMBEDDED_MODEL.name / "hf"
    if not (tokenizer_dir / "tokenizer.json").is_file():
        pytest.skip("the embedded model's tokenizer is not in the cache")
    folder = tmp_path_factory.mktemp("tiny-ckpt")
    make_tiny_model(layers=1, hidden=32, heads=2, kv_heads=1, intermediate=64, vocab=49152).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (tokenizer_dir / name).is_file():
            shutil.copy(tokenizer_dir / name, folder / name)
    return folder


@pytest.mark.parametrize("draft", ["prompt-lookup", "self"])
def test_cli_generate_speculate_adaptive(tiny_checkpoint, capsys, draft):
    from compress.cli import main

    spec = str(tiny_checkpoint) if draft == "self" else draft
    code = main(["generate", str(tiny_checkpoint), "--prompt", "one two three one two three one two",
                 "--max-new-tokens", "12", "--device", "cpu", "--draft", spec, "--speculate-k", "2",
                 "--speculate-adaptive"])
    err = capsys.readouterr().err
    assert code == 0
    assert "k=2 adaptive" in err and "output identical to plain greedy" in err
    if draft == "self":  # the model as its own draft agrees on every token, and takes its keys and values
        assert "acceptance 100.0%" in err and "target KV" in err


def test_cli_generate_rejects_bad_speculate_k(tiny_checkpoint, capsys):
    from compress.cli import main

    code = main(["generate", str(tiny_checkpoint), "--prompt", "hi", "--device", "cpu", "--draft", "prompt-lookup",
                 "--speculate-k", "0"])
    assert code == 2
    assert "--speculate-k must be >= 1" in capsys.readouterr().err
