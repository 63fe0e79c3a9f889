"""Corrupt or hostile files: one clear error each, nothing executed, nothing unpickled."""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import pytest

from compress import models
from compress.arch import UnsupportedArchitecture, arch_for
from compress.calibrate import run_layerwise
from compress.cli import main
from compress.quant.int4 import QuantArgs
from compress.quant.rtn import RTNStage
from tests.reliability.conftest import assert_one_line_error, save_tiny_model


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("hostile") / "base", layers=2)


def _variant(base: Path, tmp_path: Path, name: str) -> Path:
    target = tmp_path / name
    shutil.copytree(base, target)
    return target


def _edit_config(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


def _truncate(folder: Path) -> None:
    f = folder / "model.safetensors"
    f.write_bytes(f.read_bytes()[:5000])


def _bad_header(folder: Path) -> None:
    f = folder / "model.safetensors"
    b = f.read_bytes()
    f.write_bytes(b[:8] + b"{garbage" + b[16:])


def _huge_header_length(folder: Path) -> None:
    f = folder / "model.safetensors"
    f.write_bytes((10**12).to_bytes(8, "little") + f.read_bytes()[8:])


def _random_bytes(folder: Path) -> None:
    (folder / "model.safetensors").write_bytes(os.urandom(4096))


HOSTILE_MODEL_FOLDERS = [
    ("truncated-safetensors", _truncate, ["incomplete metadata"]),
    ("garbage-header", _bad_header, ["header"]),
    ("huge-header-length", _huge_header_length, ["header too large"]),
    ("random-bytes", _random_bytes, ["could not load"]),
    ("config-hidden-size", lambda f: _edit_config(f, hidden_size=32, head_dim=8), ["do not match", "by the config"]),
    ("config-more-layers", lambda f: _edit_config(f, num_hidden_layers=4), ["lack", "model.layers.2"]),
    ("config-vocab", lambda f: _edit_config(f, vocab_size=300), ["embed_tokens", "[300, 64]"]),
    ("config-kv-heads", lambda f: _edit_config(f, num_key_value_heads=3), ["do not match"]),
    ("config-heads-not-dividing", lambda f: _edit_config(f, num_attention_heads=3), ["not a multiple"]),
    ("config-unknown-arch", lambda f: _edit_config(f, model_type="gpt2"), ["unsupported architecture", "gpt2"]),
    ("config-not-utf8", lambda f: (f / "config.json").write_bytes(b"\xff\xfe{}"), ["not valid json"]),
    ("config-not-json", lambda f: (f / "config.json").write_text("{model_type: llama"), ["not valid json"]),
    ("config-a-list", lambda f: (f / "config.json").write_text("[1, 2]"), ["not a json object"]),
    ("no-config", lambda f: (f / "config.json").unlink(), ["no config.json"]),
]


@pytest.mark.parametrize(
    "damage,needles", [c[1:] for c in HOSTILE_MODEL_FOLDERS], ids=[c[0] for c in HOSTILE_MODEL_FOLDERS]
)
def test_hostile_model_folders(base, tmp_path, capsys, damage, needles):
    folder = _variant(base, tmp_path, "m")
    damage(folder)
    with pytest.raises((models.ModelLoadError, UnsupportedArchitecture)) as e:
        models.load(folder)
    assert "\n" not in str(e.value)
    capsys.readouterr()  # drop what the direct call printed (transformers' loading bar)
    # The same through the CLI: exit 2, one line.
    assert main(["eval", str(folder), "-q"]) == 2
    assert_one_line_error(capsys.readouterr().err, *needles)
    if (folder / "config.json").exists() and (folder / "model.safetensors").exists():
        with pytest.raises((models.ModelLoadError, UnsupportedArchitecture)):
            models.load(folder / "model.safetensors")


def test_pickle_weights_are_never_loaded(base, tmp_path):
    """A folder with only pytorch_model.bin (a pickle that runs a command) is refused unread."""
    folder = _variant(base, tmp_path, "pickled")
    (folder / "model.safetensors").unlink()
    sentinel = tmp_path / "PWNED"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {sentinel}",))

    (folder / "pytorch_model.bin").write_bytes(pickle.dumps({"model.embed_tokens.weight": Evil()}))
    with pytest.raises(models.ModelLoadError, match=r"model\.safetensors"):
        models.load(folder)
    assert not sentinel.exists()


def test_gguf_that_is_not_one(tmp_path, capsys):
    cases = [
        (b"PK\x03\x04 a zip, not a gguf", ["not a GGUF file"]),
        (b"GGUF\x03\x00\x00\x00" + b"\x00" * 10, ["could not load GGUF"]),
        (b"", ["not a GGUF file"]),
    ]
    for raw, needles in cases:
        path = tmp_path / "model.gguf"
        path.write_bytes(raw)
        with pytest.raises(models.ModelLoadError):
            models.load(path)
        assert main(["eval", str(path), "-q"]) == 2
        assert_one_line_error(capsys.readouterr().err, *needles)


def test_remote_code_is_not_run_by_default(base, tmp_path):
    """config.json and tokenizer_config.json point at code in the folder: it stays unimported."""
    folder = _variant(base, tmp_path, "remote")
    sentinel = tmp_path / "CODE_RAN"
    (folder / "evil.py").write_text(
        f"open({str(sentinel)!r}, 'w').write('ran')\n"
        "from transformers import LlamaConfig, LlamaForCausalLM\n"
        "class EvilConfig(LlamaConfig):\n    pass\n"
        "class EvilModel(LlamaForCausalLM):\n    pass\n"
    )
    auto_map = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}
    _edit_config(folder, auto_map=auto_map)
    tok_config = json.loads((folder / "tokenizer_config.json").read_text())
    tok_config["auto_map"] = {"AutoTokenizer": ["evil.EvilTokenizer", None]}
    (folder / "tokenizer_config.json").write_text(json.dumps(tok_config))
    loaded = models.load(folder)
    assert type(loaded.model).__name__ == "LlamaForCausalLM"
    assert not sentinel.exists()
    # An architecture we do not know is refused before transformers sees the folder.
    _edit_config(folder, model_type="evil")
    with pytest.raises(UnsupportedArchitecture):
        models.load(folder)
    assert not sentinel.exists()


def test_trust_remote_code_defaults_off():
    from compress import recipe as R
    from compress.cli import build_parser

    assert R.parse({"name": "x", "export": {"format": "none"}}).trust_remote_code is False
    assert build_parser().parse_args(["eval", "m"]).trust_remote_code is False
    import inspect

    assert inspect.signature(models.load).parameters["trust_remote_code"].default is False


# ---------------------------------------------------------------------------
# Exported checkpoints: manifest checksums
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoints(base, tmp_path_factory) -> dict[str, Path]:
    from compress.export import export_checkpoint

    root = tmp_path_factory.mktemp("ckpt")
    loaded = models.load(base)
    stage = RTNStage(QuantArgs(4, 32, True), ["lm_head"])
    windows = loaded.tokenizer("a short calibration text " * 4, return_tensors="pt").input_ids
    run_layerwise(loaded.model, arch_for(loaded.model), windows, [stage], progress=False)
    out = {}
    for fmt in ("gptq", "float"):
        export_checkpoint(root / fmt, loaded.model, loaded.tokenizer, stage.quantized, fmt)
        out[fmt] = root / fmt
    return out


def _flip_byte(path: Path, offset_from_end: int = 100) -> None:
    raw = bytearray(path.read_bytes())
    raw[-offset_from_end] ^= 0x01
    path.write_bytes(bytes(raw))


CHECKPOINT_DAMAGE = [
    ("flipped-bit", lambda f: _flip_byte(f / "model.safetensors"), ["checksum mismatch", "model.safetensors"]),
    ("truncated", lambda f: _truncate(f), ["model.safetensors"]),
    ("missing-file", lambda f: (f / "tokenizer.json").unlink(), ["missing", "tokenizer.json"]),
    ("config-edited", lambda f: _edit_config(f, num_hidden_layers=5), ["config.json", "manifest"]),
    ("manifest-garbage", lambda f: (f / "manifest.json").write_text("{oops"), ["not a valid manifest"]),
    ("manifest-no-files", lambda f: (f / "manifest.json").write_text('{"files": 3}'), ["not a valid manifest"]),
]


@pytest.mark.parametrize("fmt", ["gptq", "float"])
@pytest.mark.parametrize("damage,needles", [c[1:] for c in CHECKPOINT_DAMAGE], ids=[c[0] for c in CHECKPOINT_DAMAGE])
def test_checkpoint_checksum_failures(checkpoints, tmp_path, capsys, fmt, damage, needles):
    folder = tmp_path / "ckpt"
    shutil.copytree(checkpoints[fmt], folder)
    assert models.load(folder).model is not None  # intact first
    damage(folder)
    with pytest.raises(models.ModelLoadError) as e:
        models.load(folder)
    assert "\n" not in str(e.value)
    capsys.readouterr()
    generate = ["generate", str(folder), "--prompt", "hi", "--max-new-tokens", "1"]
    for argv in (["inspect", str(folder)], ["eval", str(folder), "-q"], generate):
        assert main(argv) == 2, argv
        assert_one_line_error(capsys.readouterr().err, *needles)


def test_unfinished_export_is_refused(checkpoints, tmp_path):
    from compress.checkpoint import CheckpointError, read

    staging = tmp_path / ".out.partial"
    shutil.copytree(checkpoints["gptq"], staging)
    with pytest.raises(CheckpointError, match="unfinished export"):
        read(staging)


def test_quantization_config_contradicting_tensors(checkpoints, tmp_path, capsys):
    """No manifest to catch it (another tool's folder): the unpacker must still refuse."""
    folder = tmp_path / "ckpt"
    shutil.copytree(checkpoints["gptq"], folder)
    (folder / "manifest.json").unlink()
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"]["bits"] = 8
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(models.ModelLoadError):
        models.load(folder)
    capsys.readouterr()
    assert main(["eval", str(folder), "-q"]) == 2
    assert_one_line_error(capsys.readouterr().err)
