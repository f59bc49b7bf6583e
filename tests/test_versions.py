"""Config schema versions: run directories written by older releases still ``eval`` and ``--resume``; a
newer version than this release knows is a clear error; migrations rename or drop what changed."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from evomoe.config import SCHEMA_VERSION, ConfigError, config_from_dict, load_config, to_dict
from evomoe.config.versions import MIGRATIONS, migrate

FIXTURE = Path(__file__).parent / "fixtures" / "run_v1"  # written by release 0.1.0 (schema 1)


@pytest.fixture
def run_v1(tmp_path) -> Path:
    dst = tmp_path / "run_v1"
    shutil.copytree(FIXTURE, dst)
    return dst


def test_the_fixture_is_a_first_release_run():
    assert "schema" not in (FIXTURE / "config.toml").read_text()
    state = torch.load(next(FIXTURE.glob("checkpoints/step_*")) / "trainer.pt", weights_only=False)
    assert "schema" not in state["config"] and "task" not in state["config"]


def test_every_version_has_a_migration():
    assert sorted(MIGRATIONS) == list(range(1, SCHEMA_VERSION))


def test_eval_of_a_first_release_run_gives_its_own_numbers(cli, run_v1):
    rc, out, err = cli("eval", run_v1)
    assert rc == 0, err
    recorded = json.loads((run_v1 / "eval.jsonl").read_text().splitlines()[-1])
    result = json.loads(out)
    assert result["step"] == recorded["step"] == 12
    assert result["val_loss"] == pytest.approx(recorded["val_loss"], abs=1e-6)


def test_resume_of_a_first_release_run(cli, run_v1):
    rc, out, err = cli("train", "--out", run_v1, "--resume", "--train.steps=14", "--no-progress")
    assert rc == 0, err
    assert f"resuming from {run_v1 / 'checkpoints' / 'step_00000012'} (step 12)" in err
    assert load_config(str(run_v1 / "config.toml")).schema == SCHEMA_VERSION
    assert (run_v1 / "config.toml").read_text().startswith(f"schema = {SCHEMA_VERSION}\n")
    steps = [json.loads(line)["step"] for line in (run_v1 / "metrics.jsonl").read_text().splitlines()]
    assert steps[-1] == 14 and steps == sorted(steps)


def test_a_newer_schema_is_a_clear_error(cli, run_v1):
    text = (run_v1 / "config.toml").read_text()
    (run_v1 / "config.toml").write_text(f"schema = {SCHEMA_VERSION + 1}\n" + text)
    rc, _, err = cli("train", "--out", run_v1, "--resume", "--no-progress")
    assert rc == 2
    assert f"schema = {SCHEMA_VERSION + 1} is newer than this release understands ({SCHEMA_VERSION})" in err
    assert str(run_v1 / "config.toml") in err


def test_a_checkpoint_from_a_newer_release_is_a_clear_error():
    data = to_dict(load_config("tiny"))
    data["schema"] = SCHEMA_VERSION + 1
    with pytest.raises(ConfigError, match="newer than this release"):
        config_from_dict(data, "checkpoint 'x'")


def test_v1_drops_the_removed_soft_balance_weight():
    v1 = {"router": {"name": "soft", "soft": {"balance_weight": 0.01}}, "train": {"steps": 500}}
    cfg = config_from_dict(v1)
    assert cfg.router.name == "soft" and cfg.train.steps == 500 and cfg.schema == SCHEMA_VERSION
    assert v1["router"]["soft"] == {"balance_weight": 0.01}, "migrate must not change its input"


def test_presets_and_hand_written_files_are_current(tmp_path):
    path = tmp_path / "mine.toml"
    path.write_text('[router]\nname = "topk"\n')
    assert load_config(str(path)).router.name == "topk"
    assert migrate({}, "x", assume_first=False) == {}
    for bad in ("two", 0, True):
        with pytest.raises(ConfigError, match="is not a config schema version"):
            migrate({"schema": bad}, "x", assume_first=False)


def test_new_checkpoints_carry_the_schema(tiny_run):
    state = torch.load(next(tiny_run.glob("checkpoints/step_*")) / "trainer.pt", weights_only=False)
    assert state["schema"] == SCHEMA_VERSION and state["config"]["schema"] == SCHEMA_VERSION
