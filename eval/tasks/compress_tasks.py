"""Our offline lm-eval tasks: documents from the evaluation split of a local corpus.

lm-eval calls the ``*_dataset`` functions (``custom_dataset`` in the YAML files) with the
task's metadata; ``compress.lm_eval_adapter.run_tasks`` puts the corpus there
(``compress_data``, ``compress_eval_fraction``, ``compress_text_field``, ``compress_seed``).
The split is the one our perplexity uses (``compress.data.load_corpus``): a document
never seen in calibration. Nothing is downloaded.
"""

from __future__ import annotations

import random
import re

# A sentence ends at . ! or ? followed by space and a capital, digit, quote or bracket.
# Abbreviations ("U.S. Army") sometimes split a sentence in two: harmless for a cloze.
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"(])")
MIN_SENTENCE_CHARS = 20
CLOZE_CHOICES = 4
CLOZE_MAX_CONTEXT_SENTENCES = 3


def _evaluation_documents(metadata: dict) -> list[str]:
    from compress import data

    corpus = data.load_corpus(
        str(metadata.get("compress_data", "wiki")),
        float(metadata.get("compress_eval_fraction", 0.1)),
        str(metadata.get("compress_text_field", "text")),
    )
    return corpus.evaluation


def _dataset(rows: list[dict]):
    import datasets

    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def sentences(text: str) -> list[str]:
    return [s.strip() for s in _SENTENCE_END.split(text.strip()) if s.strip()]


# -- perplexity ----------------------------------------------------------------------
def perplexity_dataset(**metadata):
    """One row per evaluation document: ``{'text': ...}``."""
    return _dataset([{"text": doc} for doc in _evaluation_documents(metadata)])


def perplexity_results(doc: dict, results: list) -> dict:
    """Word and byte perplexity as lm-eval's wikitext task counts them (on the document's own text)."""
    (loglikelihood,) = results
    words = len(re.split(r"\s+", doc["text"].strip()))
    nbytes = len(doc["text"].encode("utf-8"))
    return {
        "word_perplexity": (loglikelihood, words),
        "byte_perplexity": (loglikelihood, nbytes),
        "bits_per_byte": (loglikelihood, nbytes),
    }


# -- next-sentence cloze -----------------------------------------------------------------
def cloze_rows(docs: list[str], seed: int = 0) -> list[dict]:
    """Next-sentence choice: a paragraph's first sentences (up to 3), then its true next sentence
    among ``CLOZE_CHOICES`` choices; the others are non-opening sentences of other documents
    of similar length. Deterministic for a given ``docs`` and ``seed``."""
    rng = random.Random(seed)
    split = [sentences(d) for d in docs]
    # Distractor pool: sentences after the first (openings name their subject, too easy to spot).
    pool = [(i, s) for i, ss in enumerate(split) for s in ss[1:] if len(s) >= MIN_SENTENCE_CHARS]
    rows = []
    for i, ss in enumerate(split):
        if len(ss) < 3 or len(pool) < 4 * CLOZE_CHOICES:
            continue
        k = min(len(ss) - 1, CLOZE_MAX_CONTEXT_SENTENCES)
        answer = ss[k]
        if len(answer) < MIN_SENTENCE_CHARS:
            continue
        distractors: list[str] = []
        for attempt in range(200):
            j, s = pool[rng.randrange(len(pool))]
            similar = 0.5 <= len(s) / len(answer) <= 2.0 or attempt >= 100
            if j != i and similar and s != answer and s not in distractors:
                distractors.append(s)
                if len(distractors) == CLOZE_CHOICES - 1:
                    break
        if len(distractors) < CLOZE_CHOICES - 1:
            continue
        label = rng.randrange(CLOZE_CHOICES)
        choices = [*distractors[:label], answer, *distractors[label:]]
        rows.append({"context": " ".join(ss[:k]), "choices": choices, "label": label})
    return rows


def cloze_dataset(**metadata):
    docs = _evaluation_documents(metadata)
    return _dataset(cloze_rows(docs, int(metadata.get("compress_seed", 0))))
