"""Fixtures for the reliability suite: a tiny model folder, a tiny corpus, recipe files, a CLI runner."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import make_tiny_model, torch_threads

ROOT = Path(__file__).resolve().parents[2]

# Tiny models gain nothing from threads, and on shared cores OpenMP threads spin against
# other jobs: one thread here and in the subprocesses (also the same arithmetic in both,
# which bit-for-bit resume comparisons rely on). Only while this suite runs: the other
# suites (the embedded model's integration tests) keep torch's default.
ONE_THREAD_ENV = {"OMP_NUM_THREADS": "1"}


@pytest.fixture(autouse=True, scope="package")
def one_thread():
    with torch_threads(1):
        yield

WORDS = (
    "the river runs past old mills and stone bridges while farmers bring grain to the market town "
    "where merchants trade cloth salt iron and wine under the watch of the castle on the hill"
).split()


def byte_tokenizer():
    """A byte-level tokenizer with exactly 256 ids, built offline (no hub)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(sorted(ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok)


def save_tiny_model(path: Path, layers: int = 3, **kw) -> Path:
    """A tiny llama folder (config.json, model.safetensors, tokenizer) that models.load reads."""
    model = make_tiny_model(layers=layers, **kw)
    model.save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return path


def corpus_text(paragraphs: int = 120, seed: int = 0) -> str:
    import random

    rng = random.Random(seed)
    paras = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 60))) for _ in range(paragraphs)]
    return "\n\n".join(f"{i}: {p}." for i, p in enumerate(paras)) + "\n"


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text(corpus_text())
    return path


def tiny_recipe(model: Path, corpus: Path, output: Path, **overrides) -> dict:
    """A complete recipe for the tiny model: RTN, small windows, float export off."""
    recipe = {
        "name": "tiny",
        "model": str(model),
        "device": "cpu",
        "seed": 0,
        "batch_size": 2,
        "data": {
            "source": str(corpus),
            "calibration": {"samples": 4, "seq_len": 32},
            "evaluation": {"seq_len": 32, "max_windows": 4},
        },
        "stages": [{"type": "rtn", "bits": 4, "group_size": 32}],
        "eval": {"perplexity": True, "before": True},
        "export": {"format": "none", "output": str(output)},
    }
    for key, value in overrides.items():
        recipe[key] = value
    return recipe


def write_recipe(path: Path, recipe: dict) -> Path:
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def run_cli(*args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """``python -m compress ARGS`` from the repository root (this checkout's package)."""
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", **ONE_THREAD_ENV, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "compress", *args],
        cwd=ROOT,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def assert_one_line_error(stderr: str, *needles: str) -> None:
    """The CLI's contract for user errors: one line on stderr, no traceback, naming the problem."""
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr, stderr
    assert lines[0].startswith("compress: error:"), stderr
    for needle in needles:
        assert needle.lower() in lines[0].lower(), (needle, stderr)
