"""lm-eval adapter against direct computation, offline local tasks, and ``compress compare``."""

from __future__ import annotations

import json
import math
import random
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("lm_eval")

from compress import evaluate
from compress import lm_eval_adapter as A
from tests.conftest import make_tiny_model

sys.path.insert(0, str(A.tasks_dir()))
import compress_tasks

VOCAB = 258  # 256 bytes + <s> + </s>


def make_byte_tokenizer():
    """A byte-level tokenizer (one token per byte, BOS <s>, EOS </s>) built offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    vocab.update({"<s>": 256, "</s>": 257})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


WORDS = (
    "river mountain city valley forest ancient people language music history island king war "
    "trade bridge school church village north south east west famous small large old new"
).split()


def write_corpus(path: Path, docs: int = 160, seed: int = 0) -> Path:
    """Paragraphs of 2-5 made-up sentences: enough evaluation documents for both local tasks."""
    rng = random.Random(seed)
    paragraphs = []
    for i in range(docs):
        sentences = [
            f"{rng.choice(WORDS).capitalize()} {' '.join(rng.choices(WORDS, k=rng.randint(4, 9)))} {i}."
            for _ in range(rng.randint(2, 5))
        ]
        paragraphs.append(" ".join(sentences))
    path.write_text("\n\n".join(paragraphs), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tiny():
    return make_tiny_model(vocab=VOCAB, max_positions=256), make_byte_tokenizer()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus") / "corpus.txt")


def _instance(kind: str, args: tuple):
    from lm_eval.api.instance import Instance

    return Instance(request_type=kind, doc={}, arguments=args, idx=0)


def _direct_loglikelihood(model, ids: list[int], n_continuation: int) -> tuple[float, bool]:
    logprobs = F.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), dim=-1)
    positions = range(len(ids) - n_continuation - 1, len(ids) - 1)
    targets = ids[-n_continuation:]
    total = sum(logprobs[p, t].item() for p, t in zip(positions, targets, strict=True))
    greedy = all(logprobs[p].argmax().item() == t for p, t in zip(positions, targets, strict=True))
    return total, greedy


def test_tokenizer_round_trips():
    tok = make_byte_tokenizer()
    text = "Héllo, wörld!  Two  spaces."
    ids = tok(text, add_special_tokens=False).input_ids
    assert len(ids) == len(text.encode("utf-8"))
    assert tok.decode(ids) == text


@pytest.mark.parametrize("batch_size,budget", [(1, None), (3, None), (3, 1)])
def test_loglikelihood_equals_direct_computation(tiny, batch_size, budget, monkeypatch):
    model, tok = tiny
    if budget:  # a logits budget that allows one input per forward pass
        monkeypatch.setattr(A, "LOGITS_BUDGET", budget)
    lm = A.make_lm(model, tok, batch_size=batch_size)
    requests = [
        ("The river", " flows north"),
        ("An old king ruled the island", " for forty years."),
        ("Trailing space ", "moves to the continuation"),
        ("", "empty context"),
    ]
    got = lm.loglikelihood([_instance("loglikelihood", r) for r in requests], disable_tqdm=True)
    for (context, continuation), (logprob, greedy) in zip(requests, got, strict=True):
        # The harness moves a context's trailing spaces to the continuation (word boundaries).
        spaces = len(context) - len(context.rstrip())
        context, continuation = context.rstrip(), context[len(context) - spaces :] + continuation
        enc = tok(continuation, add_special_tokens=False).input_ids
        ids = (tok(context, add_special_tokens=False).input_ids if context else [tok.bos_token_id]) + enc
        want, want_greedy = _direct_loglikelihood(model, ids, len(enc))
        assert logprob == pytest.approx(want, abs=1e-4)
        assert greedy == want_greedy


def test_greedy_flag_is_true_for_the_models_own_continuation(tiny):
    model, tok = tiny
    lm = A.make_lm(model, tok)
    ids = tok("The valley", add_special_tokens=False).input_ids
    own = []
    for _ in range(3):
        own.append(int(model(input_ids=torch.tensor([ids + own])).logits[0, -1].argmax()))
    other = [(own[0] + 1) % VOCAB, *own[1:]]
    (logprob, greedy), (_, not_greedy) = lm._loglikelihood_tokens([(None, ids, own), (None, ids, other)])
    assert greedy and not not_greedy
    assert logprob == pytest.approx(_direct_loglikelihood(model, ids + own, 3)[0], abs=1e-4)


def test_rolling_loglikelihood_agrees_with_perplexity_code(tiny):
    model, tok = tiny
    lm = A.make_lm(model, tok, max_length=32)
    bos = tok.bos_token_id
    # One window: [BOS] + tokens, every token scored once.
    short = "A short document."
    ids = tok(short, add_special_tokens=False).input_ids
    (rolling,) = lm.loglikelihood_rolling([_instance("loglikelihood_rolling", (short,))])
    nll = evaluate.window_nll(model, torch.tensor([[bos, *ids]])).item()
    assert rolling == pytest.approx(-nll, rel=1e-5)
    # Exactly two windows of 32 predictions: the second conditions on one token before it,
    # i.e. our perplexity code on the windows [BOS]+T[:32] and T[31:64].
    text = "mountain river city and valley, " * 2  # 64 bytes
    ids = tok(text, add_special_tokens=False).input_ids
    assert len(ids) == 64
    (rolling,) = lm.loglikelihood_rolling([_instance("loglikelihood_rolling", (text,))])
    nll = evaluate.window_nll(model, torch.tensor([[bos, *ids[:32]], ids[31:64]])).sum().item()
    assert rolling == pytest.approx(-nll, rel=1e-5)


def test_generate_until_stops_at_stop_string(tiny):
    model, tok = tiny
    lm = A.make_lm(model, tok)
    free, = lm.generate_until([_instance("generate_until", ("The king", {"max_gen_toks": 12}))])
    assert 0 < len(free) <= 12
    # Greedy: the same as decoding token by token without the cache.
    ids = tok("The king", add_special_tokens=False).input_ids
    for _ in range(12):
        ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    assert tok.decode(ids[-12:]).startswith(free)
    stop = free[3:5] if len(free) >= 5 else None
    if stop:
        cut, = lm.generate_until([_instance("generate_until", ("The king", {"until": [stop], "max_gen_toks": 12}))])
        assert cut == free.split(stop)[0]


def test_cloze_rows_are_deterministic_and_well_formed():
    docs = [
        f"Doc {i} opens here. It goes on with detail number {i}. Then more about topic {i}. "
        f"Finally the story of it ends at {i}."
        for i in range(30)
    ]
    rows = compress_tasks.cloze_rows(docs, seed=1)
    assert rows == compress_tasks.cloze_rows(docs, seed=1)
    assert rows != compress_tasks.cloze_rows(docs, seed=2)
    assert len(rows) == 30
    labels = set()
    for row, doc in zip(rows, docs, strict=True):
        sentences = compress_tasks.sentences(doc)
        assert row["context"] == " ".join(sentences[:3])
        assert row["choices"][row["label"]] == sentences[3]
        assert len(set(row["choices"])) == 4
        others = [c for i, c in enumerate(row["choices"]) if i != row["label"]]
        assert not any(c in doc for c in others)
        labels.add(row["label"])
    assert len(labels) > 1


def test_local_tasks_run_offline_on_a_tiny_model(tiny, corpus, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    model, tok = tiny
    limit = 4
    out = A.run_tasks(
        model, ["compress_wiki_ppl,compress_wiki_cloze"], tokenizer=tok, data=str(corpus), limit=limit, batch_size=4
    )
    assert set(out) == {"compress_wiki_ppl", "compress_wiki_cloze"}
    cloze = out["compress_wiki_cloze"]
    assert 0.0 <= cloze["acc"] <= 1.0 and 0.0 <= cloze["acc_norm"] <= 1.0
    # Byte perplexity from our own rolling loglikelihoods of the same first documents.
    docs = compress_tasks.perplexity_dataset(compress_data=str(corpus))["test"]["text"][:limit]
    lm = A.make_lm(model, tok)
    total = sum(lm.loglikelihood_rolling([_instance("loglikelihood_rolling", (d,)) for d in docs]))
    nbytes = sum(len(d.encode("utf-8")) for d in docs)
    ppl = out["compress_wiki_ppl"]
    assert ppl["byte_perplexity"] == pytest.approx(math.exp(-total / nbytes), rel=1e-4)
    assert ppl["bits_per_byte"] == pytest.approx(-total / nbytes / math.log(2), rel=1e-4)
    assert ppl["word_perplexity"] > ppl["byte_perplexity"] > 1


def test_hub_task_offline_is_one_clear_error(tiny, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    model, tok = tiny
    with pytest.raises(A.LMEvalError, match=r"hellaswag.*offline") as e:
        A.run_tasks(model, ["hellaswag"], tokenizer=tok)
    assert "\n" not in str(e.value)
    from compress import cli

    folder = tmp_path / "tiny"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    capsys.readouterr()
    assert cli.main(["eval", str(folder), "--tasks", "arc_easy", "compress_wiki_ppl"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "arc_easy" in err and "offline" in err


def _recipe(path: Path, name: str, model: Path, corpus: Path, group_size: int) -> Path:
    import yaml

    path.write_text(
        yaml.safe_dump(
            {
                "name": name,
                "model": str(model),
                "device": "cpu",
                "data": {
                    "source": str(corpus),
                    "calibration": {"samples": 4, "seq_len": 64},
                    "evaluation": {"seq_len": 64, "max_windows": 8},
                },
                "stages": [{"type": "rtn", "bits": 4, "group_size": group_size}],
                "export": {"format": "none"},
            }
        )
    )
    return path


def test_compare_writes_matrix_json_and_plot(tiny, corpus, tmp_path, capsys, monkeypatch):
    from PIL import Image

    from compress import cli, pipeline

    model, tok = tiny
    folder = tmp_path / "tiny-llama"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    recipes = [
        _recipe(tmp_path / "a.yaml", "rtn-g32", folder, corpus, 32),
        _recipe(tmp_path / "b.yaml", "rtn-g64", folder, corpus, 64),
    ]
    out = tmp_path / "results" / "tiny"
    argv = ["compare", *map(str, recipes), "--out", str(out), "--tasks", "compress_wiki_cloze", "--limit", "3", "-q"]
    # Interrupted at the last row: nothing written, the finished rows kept for the next run.
    real_run, ran = pipeline.run, []

    def run(recipe, *args, **kwargs):
        ran.append(recipe.name)
        if recipe.name == "rtn-g64" and len(ran) == 3:
            raise KeyboardInterrupt
        return real_run(recipe, *args, **kwargs)

    monkeypatch.setattr(pipeline, "run", run)
    assert cli.main(argv) == 130
    assert not out.with_suffix(".md").exists() and not out.with_suffix(".json").exists()
    assert cli.main(argv) == 0, capsys.readouterr().err
    assert ran == ["float", "rtn-g32", "rtn-g64", "rtn-g64"]
    doc = json.loads(out.with_suffix(".json").read_text())
    rows = {r["name"]: r for r in doc["rows"]}
    assert list(rows) == ["float", "rtn-g32", "rtn-g64"]
    assert rows["float"]["bits"] == 16 and rows["float"]["method"] == "float"
    assert (rows["rtn-g32"]["method"], rows["rtn-g32"]["bits"], rows["rtn-g32"]["group_size"]) == ("rtn", 4, 32)
    # Smaller groups: more scales, more bytes; both far below the float weights.
    assert rows["float"]["weight_bytes"] > rows["rtn-g32"]["weight_bytes"] > rows["rtn-g64"]["weight_bytes"]
    assert rows["float"]["kv_bytes_per_token"] == 2 * 2 * 2 * 16 * 2  # layers × (k, v) × kv heads × dim × fp16
    for r in rows.values():
        assert r["perplexity"] > 1 and 0 <= r["lm_eval"]["compress_wiki_cloze"]["acc"] <= 1
    assert rows["rtn-g32"]["perplexity"] != rows["float"]["perplexity"]
    assert doc["protocol"]["windows"] == 8 and doc["protocol"]["seq_len"] == 64
    md = out.with_suffix(".md").read_text()
    assert "![perplexity against weight bytes](tiny.png)" in md
    assert md.count("\n| rtn-g") == 2 and "compress_wiki_cloze acc" in md
    with Image.open(out.with_suffix(".png")) as img:
        img.verify()
        assert img.format == "PNG" and img.size[0] > 200
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no leftovers
