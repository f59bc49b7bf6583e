"""Design rules of the Hugging Face adapters: ``transformers`` is imported only by the export code, lazily
(the core works without it), and bad model directories give errors naming the file."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

import evomoe
from evomoe.config import ConfigError
from evomoe.data.tokenizer import PretrainedTokenizer

PKG = Path(evomoe.__file__).parent


def transformers_imports(path: Path) -> list[tuple[int, bool]]:
    """(line, at module level) of every import of transformers in the file."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    top = {id(n) for n in tree.body}
    found = []
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [node.module or ""]
        if any(n == "transformers" or n.startswith("transformers.") for n in names):
            found.append((node.lineno, id(node) in top))
    return found


def test_transformers_is_imported_lazily_and_only_by_export():
    users = {p.relative_to(PKG).as_posix(): transformers_imports(p) for p in PKG.rglob("*.py")}
    users = {p: f for p, f in users.items() if f}
    assert set(users) == {"models/hf/write.py"}  # the export's writer
    assert not any(top for _, top in users["models/hf/write.py"])


def test_tokenizer_larger_than_the_embedding_is_an_error(tmp_path):
    from evomoe.config import Config
    from evomoe.tasks.lm import model_tokenizer as pretrained_tokenizer
    from evomoe.train.pretrained import resolve_pretrained

    pytest.importorskip("transformers")
    from .hf_tiny import save_tiny, tiny_tokenizer

    d = save_tiny("llama", tmp_path / "m")
    cfg_json = json.loads((d / "config.json").read_text())
    cfg_json["vocab_size"] = 100  # the tokenizer has ~300 ids
    (d / "config.json").write_text(json.dumps(cfg_json))
    cfg = Config()
    cfg.model.init_from = str(d)
    resolve_pretrained(cfg)
    with pytest.raises(ConfigError, match=r"tokenizer '.*tokenizer.json' has \d+ tokens.*vocab_size = 100"):
        pretrained_tokenizer(cfg)
    (d / "tokenizer.json").unlink()
    with pytest.raises(ConfigError, match="tokenizer.json' not found"):
        pretrained_tokenizer(cfg)
    (d / "tokenizer.json").write_text("{not json")
    with pytest.raises(ConfigError, match="cannot load tokenizer '.*tokenizer.json'"):
        pretrained_tokenizer(cfg)
    tok = PretrainedTokenizer.from_file(_save(tiny_tokenizer(), tmp_path / "t.json"))
    assert tok.decode(tok.encode("def return x")) == "def return x"
    assert tok.token_bytes.sum() > 0


def _save(tok, path: Path) -> Path:
    tok.save(str(path))
    return path
