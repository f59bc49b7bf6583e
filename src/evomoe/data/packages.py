"""The ``pypackages`` corpus: the Python sources of a pinned set of installed packages (no download).

The project installs these packages anyway (torch and what it pulls in, transformers, scipy, numpy,
matplotlib, the test tools), so every machine that ran the README's install holds about 200 MB of
``.py`` files at the same versions: some 58M BPE tokens at the default vocabulary. The files are found
through each package's own file list (``importlib.metadata``: the wheel's RECORD), never by walking
site-packages, so another package installed beside them changes nothing. The versions are pinned in
``pyproject.toml`` (the ``corpus`` extra, a test checks that it equals :data:`PINNED`); an installed
version that differs from its pin is an error naming the package and both versions, so two machines
never train on different text under the same corpus name.

``pypackages-xl`` adds the packages of the ``corpus-xl`` extra (``pip install -e .[corpus-xl]``).
Relative paths (the keys of the split hash and the sort order) are relative to the package's install
root, e.g. ``torch/nn/modules/linear.py``: the split does not move when a version changes.
"""

from __future__ import annotations

import importlib.metadata as md
import re
from dataclasses import dataclass
from pathlib import Path

from ..config import ConfigError

# name -> pinned version (public version: a local label such as torch's "+cpu" is not compared)
PINNED: dict[str, str] = {
    "torch": "2.13.0",
    "transformers": "5.24.0",
    "sympy": "1.14.0",
    "scipy": "1.17.1",
    "numpy": "2.4.6",
    "matplotlib": "3.11.2",
    "networkx": "3.6.1",
    "fonttools": "4.68.0",
    "pygments": "2.21.0",
    "huggingface-hub": "2.4.0",
    "tensorboard": "2.21.0",
    "mpmath": "1.3.0",
    "hypothesis": "6.170.17",
    "pytest": "9.2.0",
    "rich": "15.0.0",
    "pillow": "13.0.0",
    "protobuf": "7.36.2",
    "fsspec": "2026.9.0",
    "werkzeug": "3.1.9",
    "jinja2": "3.1.6",
    "pyparsing": "3.3.3",
    "sacrebleu": "2.6.0",
}
PINNED_XL: dict[str, str] = {
    "pandas": "3.1.1",
    "scikit-learn": "1.9.1",
    "sqlalchemy": "2.1.9",
    "django": "5.2.19",
}
CORPORA = {"pypackages": PINNED, "pypackages-xl": {**PINNED, **PINNED_XL}}
EXTRAS = {"pypackages": "corpus", "pypackages-xl": "corpus-xl"}


@dataclass(frozen=True)
class PackageFile:
    path: Path
    rel: str  # relative to the package's install root, '/' separators


@dataclass(frozen=True)
class Package:
    name: str
    version: str
    files: tuple[PackageFile, ...]


def public_version(version: str) -> str:
    """``"2.13.0+cpu"`` -> ``"2.13.0"`` (the local label names the build, not the release)."""
    return version.split("+", 1)[0]


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def install_hint(corpus: str) -> str:
    return f"pip install torch==2.13.0 -e '.[{EXTRAS[corpus]}]' (or make install)"


def find_package(corpus: str, name: str, pinned: str) -> Package:
    """One pinned package's ``.py`` files from its own file list; ConfigError when missing or not the pin."""
    try:
        dist = md.distribution(name)
    except md.PackageNotFoundError:
        raise ConfigError(
            f"data.corpus = {corpus!r}: the package {name!r} (pinned {pinned}) is not installed; "
            f"install the corpus's packages with: {install_hint(corpus)}"
        ) from None
    if public_version(dist.version) != pinned:
        raise ConfigError(
            f"data.corpus = {corpus!r}: {name} {dist.version} is installed but the corpus pins {pinned} "
            f"(another version is other text); install the pinned set with: {install_hint(corpus)}"
        )
    files = []
    for entry in dist.files or ():
        rel = entry.as_posix()
        if not rel.endswith(".py") or "__pycache__" in rel or rel.startswith(".."):
            continue  # scripts installed outside the package root (../../bin) are no package source
        files.append(PackageFile(Path(entry.locate()), rel))
    if not files:
        raise ConfigError(
            f"data.corpus = {corpus!r}: {name} {dist.version} lists no .py files (installed without its "
            f"RECORD?); reinstall it with: {install_hint(corpus)}"
        )
    return Package(normalise(name), public_version(dist.version), tuple(sorted(files, key=lambda f: f.rel)))


def find_packages(corpus: str) -> list[Package]:
    """Every package of the named corpus, in the order of its pin list."""
    if corpus not in CORPORA:
        names = ", ".join(CORPORA)
        raise ConfigError(f"data.corpus = {corpus!r}: not a package corpus (choose from: {names})")
    return [find_package(corpus, name, version) for name, version in CORPORA[corpus].items()]
