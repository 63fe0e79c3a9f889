"""End to end on the embedded SmolLM2-135M-Instruct and Wikipedia corpus, small settings."""

from __future__ import annotations

import copy
import json

import pytest
import yaml

from compress import data, evaluate, models, pipeline
from compress import recipe as R
from compress.calibrate import run_layerwise
from compress.quant.int4 import QuantArgs
from compress.quant.rtn import RTNStage

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def embedded():
    loaded = models.load("smollm2")
    corpus = data.load_corpus("wiki")
    windows = data.evaluation_windows(loaded.tokenizer, corpus.evaluation, 512, max_windows=4)
    return loaded, corpus, windows


def test_embedded_model_and_corpus(embedded):
    loaded, corpus, windows = embedded
    cfg = loaded.config
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (30, 9, 3)
    assert loaded.arch.name == "llama"
    assert len(corpus.evaluation) > 500 and len(corpus.calibration) > 5000
    assert not set(corpus.evaluation) & set(corpus.calibration)
    assert windows.shape == (4, 512)


def test_rtn_does_not_improve_on_float(embedded):
    loaded, _, windows = embedded
    float_ppl = evaluate.perplexity(loaded.model, windows, batch_size=4, progress=False)["perplexity"]
    assert 5 < float_ppl < 40, float_ppl
    model = copy.deepcopy(loaded.model)
    results = {}
    for symmetric in (True, False):
        m = copy.deepcopy(model)
        stage = RTNStage(QuantArgs(4, 128, symmetric), ["lm_head"])
        run_layerwise(m, loaded.arch, windows[:1], [stage], progress=False)
        assert len(stage.quantized) == 30 * 7
        results[symmetric] = evaluate.perplexity(m, windows, batch_size=4, progress=False)["perplexity"]
        assert float_ppl < results[symmetric] < 3 * float_ppl


def test_cli_run_writes_report(tmp_path, capsys):
    from compress.cli import main

    recipe = yaml.safe_load(open("recipes/smollm2-rtn-w4g128.yaml"))
    recipe["data"]["evaluation"] = {"seq_len": 256, "max_windows": 2}
    recipe["export"] = {"format": "none", "output": str(tmp_path / "out")}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert main(["run", str(path), "--quiet"]) == 0
    out = tmp_path / "out"
    report = json.loads((out / "report.json").read_text())
    assert report["evaluation"]["after"]["perplexity"] > report["evaluation"]["before"]["perplexity"]
    assert (out / "report.md").read_text().startswith("# compress report")
    assert R.load(out / "recipe.yaml").name == "smollm2-rtn-w4g128"
    # Running again without --overwrite is a one-line user error.
    assert main(["run", str(path), "--quiet"]) == 2
    assert "exists" in capsys.readouterr().err
    assert not list(tmp_path.glob(".out.partial"))
    assert pipeline.staging_dir(out).exists() is False
