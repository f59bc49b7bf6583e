"""Help texts are for users (every command, every preset), and ``evomoe config`` prints a preset's resolved
config with every field, as TOML that loads back to an equal config."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest

from evomoe.config import PRESET_DIR, Config, load_config

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    return lines[0]


def help_text(capsys, *argv: str) -> str:
    from evomoe.cli import main

    with pytest.raises(SystemExit) as e:
        main([*argv, "--help"])
    assert e.value.code == 0
    return capsys.readouterr().out


def test_help_is_for_users(capsys):
    text = help_text(capsys)
    assert "argv" not in text and "``" not in text and "environment" not in text
    for command in ("train", "eval", "compare", "sweep", "export", "generate", "config"):
        assert command in text


@pytest.mark.parametrize("command", ["train", "compare", "sweep"])
def test_help_of_commands_taking_a_config_names_every_preset(capsys, command):
    text = " ".join(help_text(capsys, command).split()).replace("- ", "-")  # argparse wraps, also at hyphens
    presets = sorted(p.stem for p in PRESET_DIR.glob("*.toml"))
    assert len(presets) >= 9 and all(name in text for name in presets), (presets, text)
    if command == "train":
        assert "evomoe config" in text


def flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


@pytest.mark.parametrize("preset", sorted(p.stem for p in PRESET_DIR.glob("*.toml")))
def test_config_prints_every_field_and_round_trips(cli, tmp_path, preset):
    rc, out, err = cli("config", preset, "--train.steps=5000", "--router.topk.k=2")
    assert rc == 0, err
    want = load_config(preset, ["--train.steps=5000", "--router.topk.k=2"])
    printed = tmp_path / "printed.toml"
    printed.write_text(out)
    assert load_config(str(printed)) == want  # the printed TOML loads back to an equal config
    assert set(flat(tomllib.loads(out))) == set(flat(dataclasses.asdict(Config())))  # every table and field


def test_config_errors_are_config_errors(cli):
    rc, out, err = cli("config", "tiny", "--train.lr=-1")
    assert rc == 2 and "train.lr = -1.0: must be > 0" in error_line(err) and out == ""
    rc, out, err = cli("config", "tinyy")
    assert rc == 2 and "neither a TOML file nor a preset" in error_line(err)


def test_readme_shows_the_config_command():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    using = readme.split("## Using it", 1)[1].split("```", 2)[1]
    assert "evomoe config " in using
