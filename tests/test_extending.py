"""docs/extending.md stays true: its router and task files, extracted from the page, register, pass the
router contract, and train a tiny run through the command line with EVOMOE_PLUGINS."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from evomoe.registry import ROUTERS, TASKS, load_user_plugins

DOC = Path(__file__).resolve().parents[1] / "docs" / "extending.md"


def doc_files(tmp: Path) -> dict[str, Path]:
    """Every ```python block of the page that starts with '# file: NAME', written to tmp/NAME."""
    out = {}
    for block in re.findall(r"```python\n(.*?)```", DOC.read_text(encoding="utf-8"), flags=re.S):
        first = block.splitlines()[0]
        if first.startswith("# file: "):
            path = tmp / first.removeprefix("# file: ").strip()
            path.write_text(block, encoding="utf-8")
            out[path.name] = path
    return out


@pytest.fixture(scope="module")
def plugin_files(tmp_path_factory):
    files = doc_files(tmp_path_factory.mktemp("plugins"))
    assert set(files) == {"my_threshold_router.py", "my_reverse_lm.py"}
    modules = load_user_plugins(",".join(str(p) for p in files.values()))
    yield files
    ROUTERS.unregister("threshold")  # the rest of the session sees only the shipped plug-ins
    TASKS.unregister("reverse_lm")
    for name in modules:
        sys.modules.pop(name, None)


def test_the_documented_plugins_register(plugin_files):
    assert "threshold" in ROUTERS.names() and "reverse_lm" in TASKS.names()


def test_the_documented_router_passes_the_contract(plugin_files, tmp_path):
    sys.path.insert(0, str(Path(__file__).parent / "moe"))
    import test_router_contract as contract

    for gate in contract.GATES:
        contract.test_valid_pairs_finite_weights_and_padding_never_routed("threshold", gate)
    contract.test_the_gradient_reaches_the_router("threshold")
    contract.test_evaluation_is_deterministic("threshold")
    contract.test_state_survives_a_checkpoint_round_trip("threshold", tmp_path)


def test_a_tiny_run_with_the_documented_plugins(plugin_files, cli_env, tmp_path):
    env = dict(cli_env, EVOMOE_PLUGINS=",".join(str(p) for p in plugin_files.values()))
    out = tmp_path / "run"
    args = ["tiny", "--no-progress", "--train.steps=12", "--evolve.diversify_steps=4", "--train.threads=1"]
    args += ["--router.name=threshold", "--router.threshold.min_prob=0.25", "--task.name=reverse_lm"]
    cmd = [sys.executable, "-m", "evomoe", "train", *args, "--out", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    cfg = (out / "config.toml").read_text()
    assert 'name = "reverse_lm"' in cfg and "[router.threshold]" in cfg and "min_prob = 0.25" in cfg
    last = json.loads((out / "eval.jsonl").read_text().splitlines()[-1])
    assert last["step"] == 12 and last["phase"] == "sparse" and last["val_loss"] > 0


def test_a_missing_plugin_file_is_a_clear_error(cli, monkeypatch, tmp_path):
    monkeypatch.setenv("EVOMOE_PLUGINS", str(tmp_path / "nope.py"))
    rc, _, err = cli("train", "tiny", "--out", tmp_path / "r")
    assert rc == 2 and f"plug-in file '{tmp_path / 'nope.py'}' does not exist" in err


def test_a_run_config_reads_back_without_the_user_plugins_it_did_not_select(plugin_files, tmp_path):
    from evomoe.config import ConfigError, load_config, to_toml

    cfg = load_config("tiny")
    text = to_toml(cfg)
    assert "[router.threshold]" not in text and "[router.topk]" in text  # not selected: not written
    cfg.router.name = "threshold"
    selected = to_toml(cfg)
    assert "[router.threshold]" in selected
    path = tmp_path / "config.toml"  # a run made while a plug-in that is not loaded now was
    path.write_text(to_toml(load_config("tiny")) + "\n[router.not_loaded]\nmin_prob = 0.5\n")
    assert load_config(str(path), saved=True).router.name == "dts"  # its table cannot matter: dropped
    path.write_text(path.read_text().replace('name = "dts"', 'name = "not_loaded"', 1))
    with pytest.raises(
        ConfigError, match="router.name = 'not_loaded': no such router is loaded .* EVOMOE_PLUGINS"
    ):
        load_config(str(path), saved=True)  # but the selected router must exist
    with pytest.raises(ConfigError, match="unknown config key 'router.not_loaded"):
        load_config(str(path))  # a hand-written file gets no such leniency
