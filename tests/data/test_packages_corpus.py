"""The ``pypackages`` corpus: found through the packages' own file lists, pinned versions, dedup."""

from __future__ import annotations

import importlib.metadata as md
import sys
from pathlib import Path

import pytest

from evomoe.config import ConfigError, DataConfig
from evomoe.data import packages
from evomoe.data.cache import load_or_build
from evomoe.data.corpus import list_corpus

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"


def _pins(extra: str) -> dict[str, str]:
    reqs = tomllib.loads(PYPROJECT.read_text())["project"]["optional-dependencies"][extra]
    out = {}
    for r in reqs:
        if "==" in r:
            name, version = r.split("==")
            out[packages.normalise(name)] = version
    return out


def test_pins_equal_the_install_extras():
    """What the corpus pins is what ``pip install .[corpus]`` installs (and torch the Makefile's pin)."""
    assert _pins("corpus") == {packages.normalise(k): v for k, v in packages.PINNED.items() if k != "torch"}
    assert _pins("corpus-xl") == {packages.normalise(k): v for k, v in packages.PINNED_XL.items()}
    assert "TORCH ?= torch==" + packages.PINNED["torch"] in (PYPROJECT.parent / "Makefile").read_text()


def test_the_pinned_set_is_installed_and_listed():
    listing = list_corpus(DataConfig(corpus="pypackages"))
    assert listing.kind == "packages" and [p[0] for p in listing.packages] == [
        packages.normalise(n) for n in packages.PINNED
    ]
    assert all(v == packages.PINNED[n] or packages.normalise(n) == name for (name, v, _), n in
               zip(listing.packages, packages.PINNED))  # fmt: skip
    assert sum(f.size for f in listing.files) > 150e6 and len(listing.files) > 9000
    assert all(f.rel.endswith(".py") and "__pycache__" not in f.rel for f in listing.files)
    assert [f.rel for f in listing.files] == sorted(f.rel for f in listing.files)


def _one_package(monkeypatch, name: str, version: str) -> None:
    monkeypatch.setitem(packages.CORPORA, "pypackages", {name: version})


def test_a_package_at_another_version_is_an_error(monkeypatch):
    installed = md.version("mpmath")
    _one_package(monkeypatch, "mpmath", "0.0.1")
    with pytest.raises(ConfigError, match=rf"mpmath {installed} is installed but the corpus pins 0.0.1.*"
                       r"pip install torch==.*corpus"):  # fmt: skip
        list_corpus(DataConfig(corpus="pypackages"))
    _one_package(monkeypatch, "no-such-package-here", "1.0")
    with pytest.raises(ConfigError, match="'no-such-package-here' .* is not installed"):
        list_corpus(DataConfig(corpus="pypackages"))


def test_a_package_corpus_builds_deduplicated_with_its_versions(monkeypatch, tmp_path):
    version = md.version("mpmath")
    _one_package(monkeypatch, "mpmath", version)
    cfg = DataConfig(corpus="pypackages", tokenizer="bytes", cache_dir=str(tmp_path))
    listing = list_corpus(cfg)
    assert all(f.rel.startswith("mpmath/") for f in listing.files)
    meta = load_or_build(cfg, {}, lambda s: None).meta
    n_listed = sum(1 for f in md.distribution("mpmath").files if f.suffix == ".py")  # empty ones too
    assert meta["packages"] == [{"name": "mpmath", "version": version, "files": n_listed}]
    assert meta["source_files"] == len(listing.files)  # the non-empty ones
    assert meta["dedup"] is True and meta["corpus_kind"] == "packages" and len(meta["content_sha256"]) == 64
    # another version is another corpus: another cache key
    monkeypatch.setattr(packages, "public_version", lambda v: "9.9")
    _one_package(monkeypatch, "mpmath", "9.9")
    assert list_corpus(cfg).fingerprint != listing.fingerprint
