"""Verifying a draft's second choices (siblings) in the same pass: exact greedy output, consistent caches."""

from __future__ import annotations

import pytest
import torch

from compress.runtime.speculative import ModelDraft, generate_runtime, tree_inputs
from tests.conftest import torch_threads
from tests.test_speculative import PROMPT, build_runtime_models


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def models():
    """The same target, int4 self-draft and unrelated draft as tests/test_speculative.py."""
    return build_runtime_models()


def test_tree_inputs():
    ids, pos, slots, visible = tree_inputs(9, [1, 2, 3], [7, 8], base=4)
    assert ids.tolist() == [[9, 1, 2, 3, 7, 8]]
    assert pos.tolist() == [4, 5, 6, 7, 5, 6]  # siblings share their chain token's position
    assert slots.tolist() == [4, 5, 6, 7, 8, 9]  # but not its slot
    expected = [  # slots 0..3: the cache; 4: last; 5-7: chain; 8-9: siblings
        [1, 1, 1, 1, 1, 0, 0, 0, 0, 0],
        [1, 1, 1, 1, 1, 1, 0, 0, 0, 0],
        [1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
        [1, 1, 1, 1, 1, 1, 1, 1, 0, 0],
        [1, 1, 1, 1, 1, 0, 0, 0, 1, 0],  # sibling of chain token 1: last, itself
        [1, 1, 1, 1, 1, 1, 0, 0, 0, 1],  # sibling of chain token 2: last, chain token 1, itself
    ]
    assert visible.int().tolist() == expected


def test_forward_tree_rows_equal_chain_passes(models):
    """Each row of a tree pass gives the logits a plain pass over that row's path gives."""
    target = models[0].model
    target.setup_caches(1, 64)
    last, chain, siblings = 11, [20, 21, 22], [30, 31, 32]
    base = len(PROMPT)
    with torch.inference_mode():
        target(torch.tensor([PROMPT]), torch.arange(base))
        tree = target.forward_tree(*tree_inputs(last, chain, siblings, base))[0]
        paths = [[last, *chain]] + [[last, *chain[:i], s] for i, s in enumerate(siblings)]
        rows = [list(range(len(chain) + 1))] + [[len(chain) + 1 + i] for i in range(len(siblings))]
        for path, row in zip(paths, rows):
            target.setup_caches(1, 64)
            fresh = target(torch.tensor([PROMPT + path]), torch.arange(base + len(path)))[0]
            torch.testing.assert_close(tree[row], fresh[-len(row):], rtol=1e-4, atol=1e-4)


def test_greedy_with_siblings_equals_plain(models):
    target, self_draft, other = models
    expected = target.generate_ids([PROMPT], 20).tokens[0]
    taken = 0
    for name, rt in (("self-draft", self_draft), ("other", other)):
        for k in range(1, 9):
            for siblings in sorted({1, 2, k}):
                draft = ModelDraft(rt.model, kv_source=target.model if rt is self_draft else None)
                out, stats = generate_runtime(target, draft, rt, PROMPT, 20, k=k, siblings=siblings,
                                              adaptive=k == 3)
                assert out == expected, f"{name}, k={k}, siblings={siblings}"
                taken += stats.siblings_accepted
    assert taken > 0  # the sibling path ran


def test_caches_consistent_after_sibling_acceptance(models):
    """After a run where siblings were taken, the target's cache gives a fresh prefill's next logits."""
    target, _, other = models
    draft = ModelDraft(other.model)
    out, stats = generate_runtime(target, draft, other, PROMPT, 30, k=4, siblings=4)
    assert stats.siblings_accepted > 0
    seq = PROMPT + out
    with torch.inference_mode():
        cached = target.model(torch.tensor([seq[-1:]]), torch.tensor([len(seq) - 1]))[0, -1]
        target.model.setup_caches(1, 128)
        fresh = target.model(torch.tensor([seq]), torch.arange(len(seq)))[0, -1]
    torch.testing.assert_close(cached, fresh, atol=1e-4, rtol=1e-4)
