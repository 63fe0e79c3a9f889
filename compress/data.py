"""Text sources and their tokenization into fixed windows.

Documents are split into a calibration part and an evaluation part by a hash of each
document, so the split is deterministic, independent of file order, and the two parts
never share a document.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from compress import assets

LOCAL_SUFFIXES = (".txt", ".json", ".jsonl", ".parquet")


class DataError(ValueError):
    pass


@dataclass
class Corpus:
    calibration: list[str]
    evaluation: list[str]
    source: str

    def describe(self) -> dict:
        return {
            "source": self.source,
            "calibration_documents": len(self.calibration),
            "evaluation_documents": len(self.evaluation),
        }


def _in_eval(key: str, eval_fraction: float) -> bool:
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < eval_fraction


def split_documents(docs: list[str], eval_fraction: float) -> tuple[list[str], list[str]]:
    """(calibration, evaluation) by a hash of each document's text; duplicates land together."""
    calibration, evaluation = [], []
    for doc in docs:
        (evaluation if _in_eval(doc, eval_fraction) else calibration).append(doc)
    return calibration, evaluation


def _wiki_documents(path: Path) -> list[str]:
    entries = json.loads(path.read_text(encoding="utf-8"))
    # Sorted by title so the order never depends on the file's.
    return [entries[t]["extract"].strip() for t in sorted(entries) if entries[t].get("extract", "").strip()]


def _local_documents(path: Path, text_field: str) -> list[str]:
    if path.suffix == ".txt":
        # Paragraphs (blank-line separated) are the documents.
        text = path.read_text(encoding="utf-8")
        return [p.strip() for p in text.split("\n\n") if p.strip()]
    from datasets import load_dataset

    kind = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}[path.suffix]
    try:
        ds = load_dataset(kind, data_files=str(path), split="train")
    except Exception as e:  # datasets raises many types for a bad file
        raise DataError(f"could not read {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    if text_field not in ds.column_names:
        raise DataError(f"{path}: no field '{text_field}' (fields: {', '.join(ds.column_names)})")
    return [str(t).strip() for t in ds[text_field] if t and str(t).strip()]


def load_corpus(source: str = "wiki", eval_fraction: float = 0.1, text_field: str = "text") -> Corpus:
    """Calibration and evaluation documents from a source.

    ``source``: 'wiki' (the embedded corpus), a local .txt/.json/.jsonl/.parquet file,
    or ``hub:NAME[:CONFIG]`` (online only; its 'test' split, if any, is the evaluation part).
    """
    if source in assets.CORPUS_ALIASES:
        docs = _wiki_documents(assets.embedded_corpus())
        calibration, evaluation = split_documents(docs, eval_fraction)
    elif source.startswith("hub:"):
        calibration, evaluation = _hub_documents(source[4:], text_field, eval_fraction)
    else:
        path = Path(source).expanduser()
        if not path.is_file():
            raise DataError(f"data file not found: {path}")
        if path.suffix not in LOCAL_SUFFIXES:
            raise DataError(f"{path}: unsupported data file type; use one of {', '.join(LOCAL_SUFFIXES)}")
        calibration, evaluation = split_documents(_local_documents(path, text_field), eval_fraction)
    if not calibration or not evaluation:
        raise DataError(f"{source}: too few documents to split into calibration and evaluation parts")
    return Corpus(calibration, evaluation, source)


def _hub_documents(spec: str, text_field: str, eval_fraction: float) -> tuple[list[str], list[str]]:
    import os

    from datasets import load_dataset

    name, _, config = spec.partition(":")
    if os.environ.get("HF_DATASETS_OFFLINE") == "1" or os.environ.get("HF_HUB_OFFLINE") == "1":
        raise DataError(f"hub dataset '{name}' needs the network, and the hub is offline here")
    try:
        ds = load_dataset(name, config or None)
    except Exception as e:
        raise DataError(f"could not load hub dataset '{name}': {str(e).splitlines()[0]}") from None

    def texts(split) -> list[str]:
        return [str(t).strip() for t in ds[split][text_field] if t and str(t).strip()]

    if "test" in ds and "train" in ds:
        return texts("train"), texts("test")
    first = next(iter(ds))
    return split_documents(texts(first), eval_fraction)


def bos_id(tokenizer) -> int | None:
    """The BOS id if the tokenizer adds one to every text, else None."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return None
    ids = tokenizer("a").input_ids
    return bos if ids and ids[0] == bos else None


def _token_stream(tokenizer, docs: list[str]) -> list[int]:
    return tokenizer("\n\n".join(docs), add_special_tokens=False).input_ids


def _windows(tokens: list[int], seq_len: int, bos: int | None, limit: int | None) -> Tensor:
    body = seq_len - (bos is not None)
    n = len(tokens) // body
    if limit is not None:
        n = min(n, limit)
    if n == 0:
        raise DataError(f"text too short: {len(tokens)} tokens make no window of {seq_len} tokens")
    t = torch.tensor(tokens[: n * body], dtype=torch.long).view(n, body)
    if bos is not None:
        t = torch.cat([torch.full((n, 1), bos, dtype=torch.long), t], dim=1)
    return t


def evaluation_windows(tokenizer, docs: list[str], seq_len: int, max_windows: int | None = None) -> Tensor:
    """The perplexity protocol: join with blank lines, tokenize once, cut into
    non-overlapping windows of ``seq_len`` (each starting with BOS where the tokenizer
    adds one), drop the tail."""
    return _windows(_token_stream(tokenizer, docs), seq_len, bos_id(tokenizer), max_windows)


def calibration_windows(tokenizer, docs: list[str], n: int, seq_len: int, seed: int = 0) -> Tensor:
    """``n`` non-overlapping windows of ``seq_len`` tokens from documents shuffled by ``seed``."""
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    bos = bos_id(tokenizer)
    needed = n * (seq_len - (bos is not None))
    picked: list[str] = []
    chars = 0
    for i in order:
        picked.append(docs[i])
        chars += len(docs[i])
        if chars > 6 * needed:  # generous: tokens are ~4 characters in English
            break
    tokens = _token_stream(tokenizer, picked)
    windows = _windows(tokens, seq_len, bos, n)
    if windows.shape[0] < n:
        raise DataError(
            f"calibration data too small: {windows.shape[0]} windows of {seq_len} tokens, {n} asked for"
        )
    return windows
