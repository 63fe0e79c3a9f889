"""Recipes validate with field paths; the corpus split is deterministic and disjoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from compress import data as D
from compress import recipe as R

RECIPES = sorted(Path(__file__).resolve().parent.parent.joinpath("recipes").glob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_shipped_recipes_validate(path):
    r = R.load(path)
    assert r.name == path.stem


def test_unknown_key_names_its_path():
    with pytest.raises(R.RecipeError, match=r"stages\.0\.bitz"):
        R.parse({"name": "x", "stages": [{"type": "rtn", "bitz": 4}]})
    with pytest.raises(R.RecipeError, match=r"data\.calibration\.samples"):
        R.parse({"name": "x", "data": {"calibration": {"samples": "many"}}})
    with pytest.raises(R.RecipeError, match=r"stages\.0\.bits"):
        R.parse({"name": "x", "stages": [{"type": "gptq", "bits": 9}]})


def test_awq_takes_quantizer_from_following_stage():
    stages = [{"type": "awq"}, {"type": "rtn", "bits": 3, "group_size": 64}]
    r = R.parse({"name": "x", "stages": stages, "export": {"format": "float"}})  # gptq packs no 3 bits
    awq = r.stages[0]
    assert (awq.bits, awq.group_size, awq.symmetric) == (3, 64, True)
    with pytest.raises(R.RecipeError, match="awq needs"):
        R.parse({"name": "x", "stages": [{"type": "awq"}], "export": {"format": "float"}})


def test_yaml_errors_are_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(R.RecipeError) as e:
        R.load(bad)
    assert "\n" not in str(e.value)
    with pytest.raises(R.RecipeError, match="not found"):
        R.load(tmp_path / "missing.yaml")


def test_recipe_round_trips_through_yaml():
    r = R.load(RECIPES[0])
    again = R.parse(__import__("yaml").safe_load(r.to_yaml()))
    assert again == r


def test_split_is_deterministic_and_disjoint():
    docs = [f"document number {i} " * (i % 7 + 1) for i in range(500)]
    cal, ev = D.split_documents(docs, 0.1)
    assert not set(cal) & set(ev)
    assert len(cal) + len(ev) == len(docs)
    assert 20 < len(ev) < 90
    # Independent of order.
    _cal2, ev2 = D.split_documents(list(reversed(docs)), 0.1)
    assert set(ev2) == set(ev)


class CharTokenizer:
    """Characters as tokens; optionally adds a BOS like Llama's tokenizer."""

    bos_token_id = 1

    def __init__(self, add_bos: bool):
        self.add_bos = add_bos

    def __call__(self, text, add_special_tokens=True):
        ids = [2 + (ord(c) % 200) for c in text]
        if add_special_tokens and self.add_bos:
            ids = [self.bos_token_id, *ids]
        return type("Enc", (), {"input_ids": ids})()


@pytest.mark.parametrize("add_bos", [True, False])
def test_windows_protocol(add_bos):
    tok = CharTokenizer(add_bos)
    docs = ["abc" * 30, "xyz" * 30]
    w = D.evaluation_windows(tok, docs, seq_len=16)
    stream = tok("\n\n".join(docs), add_special_tokens=False).input_ids
    body = 15 if add_bos else 16
    assert w.shape == (len(stream) // body, 16)
    if add_bos:
        assert bool((w[:, 0] == 1).all())
        assert w[0, 1:].tolist() == stream[:15]
    else:
        assert w[1].tolist() == stream[16:32]
    cal = D.calibration_windows(tok, docs * 10, n=5, seq_len=16, seed=3)
    assert cal.shape == (5, 16)
    assert torch.equal(cal, D.calibration_windows(tok, docs * 10, n=5, seq_len=16, seed=3))
    with pytest.raises(D.DataError, match="too small"):
        D.calibration_windows(tok, docs, n=1000, seq_len=16)


def test_local_files(tmp_path):
    txt = tmp_path / "c.txt"
    txt.write_text("\n\n".join(f"paragraph {i} with some words" for i in range(200)))
    corpus = D.load_corpus(str(txt))
    assert len(corpus.calibration) + len(corpus.evaluation) == 200
    jl = tmp_path / "c.jsonl"
    jl.write_text("\n".join(json.dumps({"body": f"line {i}"}) for i in range(200)))
    corpus = D.load_corpus(str(jl), text_field="body")
    assert len(corpus.calibration) + len(corpus.evaluation) == 200
    with pytest.raises(D.DataError, match="no field 'text'"):
        D.load_corpus(str(jl))
    with pytest.raises(D.DataError, match="not found"):
        D.load_corpus(str(tmp_path / "nope.txt"))
    with pytest.raises(D.DataError, match="unsupported"):
        D.load_corpus(str(txt.with_suffix(".csv")) if txt.with_suffix(".csv").write_text("a") else "")
