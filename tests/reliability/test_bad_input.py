"""Every user error is one line naming the problem, exit code 2, no traceback.

Through ``main()`` in this process (fast) for errors that need a model loaded, through
``python -m compress`` in a subprocess for argument errors and one full run.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from compress import recipe as R
from compress.cli import main
from compress.quant import int4
from tests.reliability.conftest import (
    assert_one_line_error,
    run_cli,
    tiny_recipe,
    write_recipe,
)


def _set(recipe: dict, dotted: str, value) -> dict:
    recipe = copy.deepcopy(recipe)
    *parents, last = dotted.split(".")
    node = recipe
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node[key]
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value
    return recipe


# (id, dotted field, value, words the error line must contain)
RECIPE_ERRORS = [
    ("unknown-top-key", "colour", "red", ["colour", "extra"]),
    ("unknown-stage-key", "stages.0.bitz", 4, ["stages.0.bitz"]),
    ("wrong-type-seed", "seed", "abc", ["seed", "integer"]),
    ("wrong-type-stages", "stages", {"type": "rtn"}, ["stages", "list"]),
    ("bits-too-high", "stages.0.bits", 9, ["stages.0.bits", "8"]),
    ("bits-too-low", "stages.0.bits", 1, ["stages.0.bits", "2"]),
    ("group-size-not-multiple-of-8", "stages.0.group_size", 12, ["stages.0.group_size", "multiple of 8"]),
    ("group-size-zero", "stages.0.group_size", 0, ["stages.0.group_size"]),
    ("unknown-stage-type", "stages.0.type", "magic", ["stages.0", "magic"]),
    ("bad-name", "name", "../escape", ["name"]),
    ("bad-dtype", "dtype", "float8", ["dtype"]),
    ("bad-device", "device", "banana", ["device"]),
    ("nul-in-output", "export.output", "out\x00put", ["export.output", "nul"]),
    ("bad-shard-size", "export.max_shard_size", "lots", ["export.max_shard_size", "size"]),
    ("eval-fraction-1", "data.eval_fraction", 1.0, ["data.eval_fraction"]),
    ("samples-zero", "data.calibration.samples", 0, ["data.calibration.samples"]),
    ("kv-heads-do-not-divide", "stages", [{"type": "gqa", "num_key_value_heads": 3}], ["3", "divide", "4"]),
    ("kv-heads-more-than-model", "stages", [{"type": "gqa", "num_key_value_heads": 4}], ["4", "more than"]),
    ("keep-more-layers", "stages", [{"type": "drop_layers", "keep": 9}], ["stages.0.keep", "9"]),
    ("missing-model", "model", "/nonexistent/model", ["model not found", "/nonexistent/model"]),
    ("missing-data", "data.source", "/nonexistent/corpus.txt", ["data file not found"]),
    ("bad-data-suffix", "data.source", "__RECIPE__", ["unsupported data file type"]),
    ("hub-data-offline", "data.source", "hub:some/dataset", ["offline"]),
]


@pytest.fixture
def base(tiny_dir, corpus_file, tmp_path) -> dict:
    return tiny_recipe(tiny_dir, corpus_file, tmp_path / "out")


@pytest.mark.parametrize("field,value,needles", [e[1:] for e in RECIPE_ERRORS], ids=[e[0] for e in RECIPE_ERRORS])
def test_recipe_errors_are_one_line_exit_2(base, tmp_path, capsys, monkeypatch, field, value, needles):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    path = tmp_path / "r.yaml"
    if value == "__RECIPE__":
        value = str(path)
    write_recipe(path, _set(base, field, value))
    assert main(["run", str(path), "-q"]) == 2
    assert_one_line_error(capsys.readouterr().err, *needles)
    assert not (tmp_path / "out").exists()
    assert not (tmp_path / ".out.partial").exists()


def test_data_errors(base, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n  \n")
    small = tmp_path / "small.txt"
    small.write_text("\n\n".join(f"w{i}" for i in range(20)))
    cases = [
        (empty, {}, ["too few documents"]),
        (small, {"eval_fraction": 0.5, "evaluation": {"seq_len": 200}}, ["too short", "200"]),
    ]
    for source, extra, needles in cases:
        recipe = copy.deepcopy(base)
        recipe["data"].update(source=str(source), **extra)
        path = write_recipe(tmp_path / "r.yaml", recipe)
        assert main(["run", str(path), "-q"]) == 2
        assert_one_line_error(capsys.readouterr().err, *needles)


def test_calibration_data_too_small_is_a_data_error():
    from compress import data as D
    from tests.reliability.conftest import byte_tokenizer

    with pytest.raises(D.DataError, match="calibration data too small"):
        D.calibration_windows(byte_tokenizer(), ["a " * 70, "b " * 70], n=8, seq_len=64)


def test_recipe_file_errors(tmp_path, capsys):
    missing = tmp_path / "missing.yaml"
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"name: \xff\xfe\x00garbage\x80")
    not_mapping = tmp_path / "list.yaml"
    not_mapping.write_text("- a\n- b\n")
    bad_date = tmp_path / "date.yaml"
    bad_date.write_text("name: x\nseed: 2020-13-45\n")
    huge = tmp_path / "huge.yaml"
    huge.write_text("# " + "x" * (R.MAX_RECIPE_BYTES + 10))
    nested = tmp_path / "nested.yaml"
    nested.write_text("[" * 5000)
    folder = tmp_path / "folder.yaml"
    folder.mkdir()
    cases = [
        (missing, ["recipe not found"]),
        (binary, ["not utf-8"]),
        (not_mapping, ["mapping"]),
        (bad_date, ["not valid yaml", "month"]),
        (huge, ["too large"]),
        (nested, ["not valid yaml"]),
        (folder, ["recipe not found"]),
    ]
    for path, needles in cases:
        assert main(["run", str(path), "-q"]) == 2, path
        assert_one_line_error(capsys.readouterr().err, *needles)


def test_output_folder_rules(base, tmp_path, capsys, monkeypatch):
    """Existing output needs --overwrite; some folders are never written at all."""
    out = Path(base["export"]["output"])
    path = write_recipe(tmp_path / "r.yaml", base)
    monkeypatch.chdir(tmp_path)

    out.mkdir()
    (out / "recipe.yaml").write_text("name: earlier\n")
    assert main(["run", str(path), "-q"]) == 2
    assert_one_line_error(capsys.readouterr().err, "exists", "--overwrite")

    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "holiday.jpg").write_bytes(b"\xff\xd8")
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    cases = [
        (foreign, ["not written by compress"]),
        (a_file, ["not a folder"]),
        (tmp_path, ["current folder"]),
        (Path(base["model"]).parent, ["would contain or replace the input"]),
        (Path("/"), ["root"]),
    ]
    for output, needles in cases:
        assert main(["run", str(path), "-q", "--overwrite", "-o", str(output)]) == 2, output
        assert_one_line_error(capsys.readouterr().err, *needles)
    assert (foreign / "holiday.jpg").exists() and a_file.read_text() == "x"
    assert main(["run", str(path), "-q", "--device", "banana"]) == 2
    assert_one_line_error(capsys.readouterr().err, "device")


@pytest.mark.skipif(torch.cuda.is_available(), reason="tests the error when CUDA is missing")
def test_cuda_without_cuda(base, tmp_path, capsys):
    path = write_recipe(tmp_path / "r.yaml", {**base, "device": "cuda"})
    assert main(["run", str(path), "-q"]) == 2
    assert_one_line_error(capsys.readouterr().err, "no CUDA device")


def test_eval_command_errors(tiny_dir, tmp_path, capsys):
    cases = [
        (["eval", "/nonexistent/model"], ["model not found"]),
        (["eval", str(tiny_dir), "--data", str(tmp_path / "none.txt")], ["data file not found"]),
        (["eval", str(tmp_path)], ["no config.json"]),
    ]
    for argv, needles in cases:
        assert main([*argv, "-q"]) == 2, argv
        assert_one_line_error(capsys.readouterr().err, *needles)


ARG_ERRORS = [
    ([], ["required"]),
    (["frobnicate"], ["invalid choice", "frobnicate"]),
    (["run"], ["recipe"]),
    (["run", "r.yaml", "--bogus"], ["unrecognized", "--bogus"]),
    (["eval", "m", "--seq-len", "0"], ["--seq-len", "at least 1"]),
    (["eval", "m", "--seq-len", "abc"], ["--seq-len", "not an integer"]),
    (["eval", "m", "--batch-size", "-3"], ["--batch-size"]),
    (["eval", "m", "--eval-fraction", "2"], ["--eval-fraction", "between 0 and 1"]),
    (["eval", "m", "--dtype", "float8"], ["--dtype", "float8"]),
]


@pytest.mark.parametrize("argv,needles", ARG_ERRORS, ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_argument_errors_in_a_subprocess(argv, needles):
    p = run_cli(*argv)
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in p.stderr, p.stderr
    assert lines[0].startswith("compress"), p.stderr
    for needle in needles:
        assert needle.lower() in lines[0].lower(), (needle, p.stderr)


def test_recipe_error_in_a_subprocess(base, tmp_path):
    """The real entry point: exit status 2, one line on stderr, nothing on stdout."""
    path = write_recipe(tmp_path / "r.yaml", _set(base, "stages.0.bits", 12))
    p = run_cli("run", str(path), "-q")
    assert p.returncode == 2
    assert p.stdout == ""
    assert_one_line_error(p.stderr, "stages.0.bits")


def test_group_size_rule_ragged_last_group():
    """Rule (recipe + int4): group size -1 or a multiple of 8; one that does not divide the
    input width is allowed and leaves a smaller last group, as the GPTQ format does."""
    recipe = R.parse({"name": "x", "stages": [{"type": "rtn", "group_size": 24}]})
    assert recipe.stages[0].group_size == 24
    w = torch.randn(16, 64)
    qw = int4.quantize(w, int4.QuantArgs(4, 24, True))
    assert qw.scales.shape == (16, 3)  # 24 + 24 + 16
    assert torch.isfinite(qw.dequantize()).all()
    assert (qw.group_index()[48:] == 2).all()
    for bad in (0, 4, 12, -2):
        with pytest.raises(R.RecipeError, match="group_size"):
            R.parse({"name": "x", "stages": [{"type": "rtn", "group_size": bad}]})


def test_bit_width_the_export_cannot_pack_is_caught_before_any_work():
    for fmt in ("gptq", "compressed-tensors"):
        with pytest.raises(R.RecipeError, match="packs 2, 4 or 8 bits"):
            R.parse({"name": "x", "stages": [{"type": "gptq", "bits": 3}], "export": {"format": fmt}})
    assert R.parse({"name": "x", "stages": [{"type": "gptq", "bits": 3}], "export": {"format": "float"}})


def test_output_may_be_anywhere_but_nothing_is_written_outside_it(base, tmp_path, monkeypatch):
    """Rule: the output folder is where the user says (``../x`` and absolute paths included);
    the job writes nothing else outside it (its staging sibling is gone when it ends)."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    recipe = copy.deepcopy(base)
    recipe["export"] = {"format": "gptq", "output": "../elsewhere/out"}
    path = write_recipe(work / "r.yaml", recipe)
    before = {p for p in tmp_path.rglob("*")}
    assert main(["run", str(path), "-q"]) == 0
    out = (work / "../elsewhere/out").resolve()
    created = {p.resolve() for p in tmp_path.rglob("*")} - {p.resolve() for p in before}
    outside = [p for p in created if p != out and out not in p.parents and p != out.parent]
    assert outside == [], outside
    assert (out / "manifest.json").is_file() and (out / "model.safetensors").is_file()
    # The recipe name cannot smuggle a path into the default output folder.
    with pytest.raises(R.RecipeError, match="name"):
        R.parse({"name": "../../x", "export": {"format": "none"}})
