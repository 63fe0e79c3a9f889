"""Interruption and resume: a job stopped at any point leaves no finished-looking output, and
``--resume`` continues from the last completed layer to a checkpoint identical, bit for bit,
to an uninterrupted run with the same seed.

Real SIGKILL and SIGINT go to ``python -m compress`` subprocesses (the three run side by
side); the other interruption points are simulated in this process by making the test
hook ``pipeline.fault`` raise, which leaves the same files behind as a kill would there.
"""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from compress import pipeline
from compress import recipe as R
from compress.cli import main
from tests.reliability.conftest import ROOT, save_tiny_model, tiny_recipe, write_recipe


@pytest.fixture(scope="module")
def setup(tmp_path_factory, corpus_file):
    """A 3-layer tiny model, an AWQ + GPTQ recipe (uses calibration activations and notes), and
    the reference checkpoint of an uninterrupted run."""
    root = tmp_path_factory.mktemp("resume")
    model = save_tiny_model(root / "model", layers=3)
    recipe = tiny_recipe(
        model, corpus_file, root / "ref",
        stages=[{"type": "awq", "grid": 4, "clip_grid": 4}, {"type": "gptq", "bits": 4, "group_size": 32}],
    )
    recipe["export"]["format"] = "gptq"
    recipe["eval"] = {"perplexity": True, "before": True}
    recipe["data"]["evaluation"]["max_windows"] = 2
    pipeline.run(R.parse(recipe), progress=False)
    return root, recipe


def _checkpoint(folder: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    assert tensors, f"no weights in {folder}"
    return tensors


def assert_identical(out: Path, ref: Path) -> None:
    a, b = _checkpoint(out), _checkpoint(ref)
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name
    assert json.loads((out / "config.json").read_text()) == json.loads((ref / "config.json").read_text())
    ra, rb = (json.loads((p / "report.json").read_text()) for p in (out, ref))
    assert ra["evaluation"] == rb["evaluation"]
    assert ra["notes"] == rb["notes"]


def _recipe_file(setup, name: str) -> tuple[Path, Path]:
    root, recipe = setup
    out = root / name
    recipe = copy.deepcopy(recipe)
    recipe["export"]["output"] = str(out)
    path = write_recipe(root / f"{name}.yaml", recipe)
    return path, out


class _Killed(BaseException):
    """Stands for SIGKILL in this process: nothing catches it."""


# Points the pipeline passes, in order; layers are 0..2.
SIMULATED = ["after_before_eval", "before_save:0", "mid_save:0", "after_save:0", "mid_save:1", "after_save:2",
             "after_layers", "before_commit"]


def _interrupt_then_resume(path: Path, point: str, monkeypatch, capsys, out: Path | None = None) -> None:
    """Run the recipe, "kill" it at ``point``, check nothing finished-looking is left at ``out``, resume."""

    def fault(where: str) -> None:
        if where == point:
            raise _Killed(where)

    monkeypatch.setattr(pipeline, "fault", fault)
    with pytest.raises(_Killed):
        main(["run", str(path), "-q"])
    if out is not None:
        assert not out.exists(), "an interrupted job must not leave a finished-looking output"
    monkeypatch.setattr(pipeline, "fault", lambda where: None)
    assert main(["run", str(path), "-q", "--resume"]) == 0, capsys.readouterr().err


@pytest.mark.parametrize("point", SIMULATED)
def test_resume_after_interruption_point(setup, monkeypatch, capsys, point):
    root, _ = setup
    path, out = _recipe_file(setup, f"sim-{point.replace(':', '-')}")
    _interrupt_then_resume(path, point, monkeypatch, capsys, out)
    assert not pipeline.staging_dir(out).exists()
    assert not (out / "progress").exists()
    assert_identical(out, root / "ref")


def _start(path: Path, fault: str) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "COMPRESS_FAULT": fault}
    return subprocess.Popen(
        [sys.executable, "-m", "compress", "run", str(path), "-q"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        # A shell that starts the test run in the background ignores SIGINT, and children inherit that:
        # give the child the default disposition so Python installs its KeyboardInterrupt handler.
        preexec_fn=_default_sigint,
    )


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _wait_for_pause(p: subprocess.Popen) -> None:
    for line in p.stderr:
        if line.startswith("compress-fault: paused"):
            return
    raise AssertionError(f"never paused; exit {p.wait()}")


def test_sigkill_and_sigint_then_resume(setup, capsys):
    """Three real processes side by side: SIGKILL from inside mid-save, SIGKILL from outside
    while working on a layer, Ctrl-C (SIGINT) between layers."""
    root, _ = setup
    runs = {name: _recipe_file(setup, name) for name in ("kill-mid-save", "kill-outside", "sigint")}
    procs = {
        "kill-mid-save": _start(runs["kill-mid-save"][0], "kill@mid_save:1"),
        "kill-outside": _start(runs["kill-outside"][0], "pause@before_save:2"),
        "sigint": _start(runs["sigint"][0], "pause@after_save:1"),
    }
    try:
        _wait_for_pause(procs["kill-outside"])
        procs["kill-outside"].send_signal(signal.SIGKILL)
        _wait_for_pause(procs["sigint"])
        procs["sigint"].send_signal(signal.SIGINT)
        results = {name: (p.wait(timeout=300), p.stderr.read()) for name, p in procs.items()}
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
    assert results["kill-mid-save"][0] == -signal.SIGKILL
    assert results["kill-outside"][0] == -signal.SIGKILL
    code, err = results["sigint"]
    assert code == 130, err
    lines = [x for x in err.strip().splitlines() if x.strip()]
    assert lines[-1].startswith("compress: interrupted;") and "--resume" in lines[-1], err
    assert "Traceback" not in err

    expected_start = {"kill-mid-save": 1, "kill-outside": 2, "sigint": 2}
    for name, (path, out) in runs.items():
        assert not out.exists(), name
        state = json.loads((pipeline.staging_dir(out) / "progress" / "state.json").read_text())
        assert state["done_layers"] == expected_start[name], name
        assert main(["run", str(path), "-q", "--resume"]) == 0, capsys.readouterr().err
        report = json.loads((out / "report.json").read_text())
        assert report["resumed_after_layer"] == expected_start[name]
        assert_identical(out, root / "ref")


def test_resume_refuses_a_changed_recipe_and_keeps_progress(setup, monkeypatch, capsys):
    _, recipe = setup
    path, out = _recipe_file(setup, "changed")

    def fault(where: str) -> None:
        if where == "after_save:1":
            raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "fault", fault)
    assert main(["run", str(path), "-q"]) == 130
    err = capsys.readouterr().err
    assert "progress kept" in err and "--resume" in err
    monkeypatch.setattr(pipeline, "fault", lambda where: None)
    changed = json.loads(json.dumps(recipe))
    changed["stages"][1]["bits"] = 2
    changed["export"]["output"] = str(out)
    write_recipe(path, changed)
    assert main(["run", str(path), "-q", "--resume"]) == 2
    assert "different recipe" in capsys.readouterr().err
    assert (pipeline.staging_dir(out) / "progress" / "state.json").is_file()
    # Without --resume the progress is discarded and the job starts over.
    assert main(["run", str(path), "-q"]) == 0
    assert not pipeline.staging_dir(out).exists()
    assert "resumed_after_layer" not in json.loads((out / "report.json").read_text())


def test_resume_with_nothing_to_resume_starts_over(setup, caplog):
    root, _ = setup
    path, out = _recipe_file(setup, "fresh")
    assert main(["run", str(path), "-q", "--resume"]) == 0
    assert "nothing to resume" in caplog.text
    assert_identical(out, root / "ref")


def test_damaged_progress_is_a_clean_error(setup, monkeypatch, capsys):
    path, out = _recipe_file(setup, "damaged")

    def fault(where: str) -> None:
        if where == "after_save:1":
            raise _Killed(where)

    monkeypatch.setattr(pipeline, "fault", fault)
    with pytest.raises(_Killed):
        main(["run", str(path), "-q"])
    monkeypatch.setattr(pipeline, "fault", lambda where: None)
    progress = pipeline.staging_dir(out) / "progress"
    layer = progress / "layer_0000.safetensors"
    layer.write_bytes(layer.read_bytes()[:100])
    assert main(["run", str(path), "-q", "--resume"]) == 2
    err = capsys.readouterr().err
    assert "damaged" in err and len(err.strip().splitlines()) == 1
    (progress / "state.json").write_text("{not json")
    assert main(["run", str(path), "-q", "--resume"]) == 2
    assert "unreadable progress" in capsys.readouterr().err


def test_reshaping_stage_needs_restore_layer(tmp_path):
    """Progress of a stage that changed tensor shapes resumes only through its restore_layer."""
    from compress.calibrate import LayerInputs
    from compress.resume import Progress, ResumeError
    from tests.conftest import make_tiny_model

    class Shrink:
        name = "shrink"

        def apply(self, layer):
            v = layer.self_attn.v_proj
            v.weight.data = v.weight.data[:16].clone()

    class ShrinkWithRestore(Shrink):
        def __init__(self):
            self.restored: list[int] = []

        def restore_layer(self, model, layer, index):
            self.restored.append(index)

    model = make_tiny_model(layers=2)
    layers = model.model.layers
    Shrink().apply(layers[0])
    progress = Progress(tmp_path, "fp")
    progress.start()
    progress.save_layer(0, "model.layers.0", layers[0], [Shrink()], LayerInputs([torch.zeros(1, 4, 64)], [{}]))

    fresh = make_tiny_model(layers=2)
    reader = Progress(tmp_path, "fp")
    reader.load_state()
    with pytest.raises(ResumeError, match="changed tensor shapes"):
        reader.restore(fresh, fresh.model.layers, [Shrink()])
    fresh = make_tiny_model(layers=2)
    stage = ShrinkWithRestore()
    point = reader.restore(fresh, fresh.model.layers, [stage])
    assert point.done_layers == 1 and stage.restored == [0]
    assert fresh.model.layers[0].self_attn.v_proj.weight.shape == (16, 64)
    assert torch.equal(fresh.model.layers[0].self_attn.v_proj.weight, layers[0].self_attn.v_proj.weight)


@pytest.mark.parametrize("pooling", ["mean", "fit"])
def test_resume_a_gqa_recipe(setup, monkeypatch, capsys, pooling):
    """MHA→GQA reshapes k/v and changes head counts: resumed, the result is still identical."""
    root, recipe = setup
    recipe = copy.deepcopy(recipe)
    recipe["stages"] = [{"type": "gqa", "num_key_value_heads": 1, "pooling": pooling},
                        {"type": "rtn", "bits": 4, "group_size": 32}]
    recipe["export"] = {"format": "gptq", "output": str(root / f"gqa-ref-{pooling}")}
    pipeline.run(R.parse(recipe), progress=False)
    out = root / f"gqa-{pooling}"
    recipe["export"]["output"] = str(out)
    path = write_recipe(root / f"gqa-{pooling}.yaml", recipe)
    _interrupt_then_resume(path, "after_save:1", monkeypatch, capsys, out)
    assert json.loads((out / "report.json").read_text())["resumed_after_layer"] == 2
    assert json.loads((out / "config.json").read_text())["num_key_value_heads"] == 1
    assert_identical(out, root / f"gqa-ref-{pooling}")


def test_resume_a_drop_layers_recipe(setup, monkeypatch, capsys):
    """drop_layers scores every layer before choosing: the scores survive the interruption."""
    root, recipe = setup
    recipe = copy.deepcopy(recipe)
    recipe["stages"] = [{"type": "drop_layers", "keep": 2}, {"type": "rtn", "bits": 4, "group_size": 32}]
    recipe["export"] = {"format": "gptq", "output": str(root / "drop-ref")}
    pipeline.run(R.parse(recipe), progress=False)
    out = root / "drop"
    recipe["export"]["output"] = str(out)
    path = write_recipe(root / "drop.yaml", recipe)
    _interrupt_then_resume(path, "after_save:1", monkeypatch, capsys, out)
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 2
    assert_identical(out, root / "drop-ref")


def test_offload_activations_reaches_the_engine(setup, monkeypatch):
    """The recipe's offload_activations is handed to the engine; on the CPU (activations already in
    CPU memory) it changes nothing. Its GPU behaviour is tested in tests/test_cuda.py."""
    root, recipe = setup
    recipe = copy.deepcopy(recipe)
    recipe["offload_activations"] = True
    recipe["export"]["output"] = str(root / "offload")
    seen = []
    real = pipeline.run_layerwise

    def spy(*args, **kwargs):
        seen.append(kwargs.get("offload_activations"))
        return real(*args, **kwargs)

    monkeypatch.setattr(pipeline, "run_layerwise", spy)
    pipeline.run(R.parse(recipe), progress=False)
    assert seen == [True]
    assert_identical(root / "offload", root / "ref")
