"""The second corpus: the Python documentation's reStructuredText sources (the ``pydocs`` preset)."""

from __future__ import annotations

from pathlib import Path

import pytest

from evomoe.config import ConfigError, load_config
from evomoe.data import list_corpus


def test_pydocs_preset_reads_the_rst_sources():
    cfg = load_config("pydocs")
    assert cfg.data.corpus.endswith("/html/_sources") and cfg.data.extensions == ".txt"
    assert cfg.model == load_config("default").model  # the default model on another corpus
    if not Path(cfg.data.corpus).is_dir():
        pytest.skip("python3.X-doc is not installed here")
    listing = list_corpus(cfg.data)
    assert len(listing.files) > 100 and all(f.rel.endswith(".rst.txt") for f in listing.files)


def test_a_missing_doc_corpus_says_how_to_fetch_it():
    cfg = load_config("pydocs", ["--data.corpus=/usr/share/doc/python3.99/html/_sources"])
    with pytest.raises(ConfigError, match=r"apt-get install -y python3\.99-doc"):
        list_corpus(cfg.data)
