"""Atomic, verified checkpoints: layout, keep-K, fault injection (truncated file, flipped byte, torn
manifest, bad ``latest``), fallback to the previous good checkpoint, a full disk, non-finite weights.
"""

from __future__ import annotations

import errno
import json
import math
import pathlib
import re
import shutil
from pathlib import Path

import pytest
import torch
from short_run import short_overrides
from torch import nn

from evomoe.train import checkpoint as ckpt
from evomoe.train.metrics import read_jsonl

NEWEST, PREVIOUS = "step_00000040", "step_00000039"


def flip_byte(path: Path, offset: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    i = len(data) // 2 if offset is None else offset
    data[i] ^= 0x5A
    path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])


FAULTS = {
    "truncated weights": (
        lambda d: truncate(d / "model.safetensors"),
        "model.safetensors fails its checksum",
    ),
    "flipped byte in weights": (
        lambda d: flip_byte(d / "model.safetensors"),
        "model.safetensors fails its checksum",
    ),
    "truncated trainer state": (lambda d: truncate(d / "trainer.pt"), "trainer.pt fails its checksum"),
    "flipped byte in trainer state": (lambda d: flip_byte(d / "trainer.pt"), "trainer.pt fails its checksum"),
    "torn manifest": (lambda d: truncate(d / "manifest.json"), "manifest.json is corrupt"),
    "no manifest (killed mid-write)": (
        lambda d: (d / "manifest.json").unlink(),
        "incomplete (no manifest.json)",
    ),
    "weights missing": (lambda d: (d / "model.safetensors").unlink(), "missing model.safetensors"),
}


@pytest.fixture
def checkpoints(tmp_path, tiny_run) -> Path:
    dst = tmp_path / "checkpoints"
    shutil.copytree(tiny_run / "checkpoints", dst)
    return dst


def test_every_checkpoint_verifies_and_nothing_temporary_is_left(tiny_run):
    root = tiny_run / "checkpoints"
    names = sorted(p.name for p in root.iterdir())
    assert names == ["latest", "step_00000036", PREVIOUS, NEWEST]  # keep_checkpoints = 3, no .tmp_*
    for d in root.glob("step_*"):
        manifest = ckpt.verify_checkpoint(d)
        assert manifest["step"] == int(d.name[5:])
        assert set(manifest["files"]) == {"model.safetensors", "trainer.pt"}
        assert all(len(h) == 64 for h in manifest["files"].values())  # sha256


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_fault_is_detected_and_loading_falls_back(checkpoints, fault):
    inject, message = FAULTS[fault]
    inject(checkpoints / NEWEST)
    with pytest.raises(ckpt.CheckpointError, match=re.escape(message)) as info:
        ckpt.verify_checkpoint(checkpoints / NEWEST)
    assert NEWEST in str(info.value)  # the message names the checkpoint
    logs: list[str] = []
    assert ckpt.find_good_checkpoint(checkpoints, logs.append) == checkpoints / PREVIOUS
    assert len(logs) == 1 and message in logs[0] and "falling back to an earlier checkpoint" in logs[0]
    assert (checkpoints / NEWEST).is_dir()  # reported, never deleted


def test_latest_pointer_to_a_missing_checkpoint_is_ignored(checkpoints):
    (checkpoints / "latest").write_text("step_00000099")
    assert ckpt.find_good_checkpoint(checkpoints, lambda s: None) == checkpoints / NEWEST
    (checkpoints / "latest").write_text("")
    assert ckpt.find_good_checkpoint(checkpoints, lambda s: None) == checkpoints / NEWEST


def test_latest_pointer_with_a_flipped_byte_is_ignored(checkpoints):
    flip_byte(checkpoints / "latest", offset=0)  # 's' ^ 0x5A = ')' : still ASCII
    assert ckpt.find_good_checkpoint(checkpoints, lambda s: None) == checkpoints / NEWEST
    (checkpoints / "latest").write_bytes(b"\xff" + NEWEST.encode()[1:])
    try:
        found = ckpt.find_good_checkpoint(checkpoints, lambda s: None)
    except UnicodeDecodeError as e:
        raise AssertionError(f"invalid UTF-8 in 'latest' is not handled: {e!r}") from None
    assert found == checkpoints / NEWEST


def test_resume_falls_back_to_the_previous_checkpoint_and_stays_exact(cli, copy_run, tiny_args, tiny_run):
    run = copy_run()
    flip_byte(run / "checkpoints" / NEWEST / "model.safetensors")
    rc, out, err = cli("train", *tiny_args, "--out", run, "--resume")
    assert rc == 0, err
    assert (
        f"warning: checkpoint '{run / 'checkpoints' / NEWEST}': model.safetensors fails its checksum" in err
    )
    assert f"resuming from {run / 'checkpoints' / PREVIOUS} (step 39)" in err
    assert "done: 40 steps" in out
    got, want = read_jsonl(run / "metrics.jsonl"), read_jsonl(tiny_run / "metrics.jsonl")
    assert [r["step"] for r in got] == list(range(1, 41))
    assert [r["loss"] for r in got] == [r["loss"] for r in want]
    ckpt.verify_checkpoint(run / "checkpoints" / NEWEST)  # rewritten, and bitwise the reference weights
    digest = lambda r: json.loads((r / "checkpoints" / NEWEST / "manifest.json").read_text())["files"]  # noqa: E731
    assert digest(run)["model.safetensors"] == digest(tiny_run)["model.safetensors"]


def test_eval_falls_back_and_fails_clearly_when_nothing_verifies(cli, copy_run):
    run = copy_run()
    truncate(run / "checkpoints" / NEWEST / "trainer.pt")
    rc, out, err = cli("eval", run)
    assert rc == 0, err
    assert json.loads(out)["step"] == 39 and "trainer.pt fails its checksum" in err
    for d in (run / "checkpoints").glob("step_*"):
        flip_byte(d / "model.safetensors")
    rc, out, err = cli("eval", run)
    assert rc == 2 and out == ""
    assert f"error: no complete checkpoint under '{run}/checkpoints'" in err


def test_a_run_that_starts_over_keeps_its_new_checkpoints(cli, copy_run, tiny_args, monkeypatch):
    import os
    import signal

    from evomoe.train.trainer import Trainer

    run = copy_run()
    for d in (run / "checkpoints").glob("step_*"):
        truncate(d / "trainer.pt")
    original = Trainer.train_step

    def stop_at_4(self, step, interval):
        original(self, step, interval)
        if step + 1 == 4:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(Trainer, "train_step", stop_at_4)
    rc, out, err = cli("train", *tiny_args, "--out", run, "--resume")
    assert rc == 130 and "starting a new run" in err, err
    latest = run / "checkpoints" / (run / "checkpoints" / "latest").read_text()
    assert latest.name == "step_00000004"
    assert latest.is_dir(), "the checkpoint saved on SIGTERM was pruned in favour of older-run ones"
    ckpt.verify_checkpoint(latest)


# ----------------------------------------------------------------------------------------------------
# a full disk


SHORT = ["tiny", "--no-progress", *short_overrides(eval_every=6, ckpt_every=4, log_every=2)]
ENOSPC = OSError(errno.ENOSPC, "No space left on device")  # as a write() raises it: no file name


def fill_disk_at(monkeypatch, step: int, where: str) -> None:
    """From checkpoint ``step`` on, writing ``where`` (weights: safetensors, state: trainer.pt) fails."""
    tmp_name = f".tmp_step_{step:08d}"
    if where == "state":
        real = pathlib.Path.write_bytes

        def write_bytes(self, data):
            if self.name == "trainer.pt" and self.parent.name >= tmp_name:
                raise OSError(errno.ENOSPC, "No space left on device")
            return real(self, data)

        monkeypatch.setattr(pathlib.Path, "write_bytes", write_bytes)
    else:
        from safetensors import SafetensorError

        for name in ("save_model", "save_file"):
            real_save = getattr(ckpt, name, None)
            if real_save is None:
                continue

            def save(obj, filename, *a, _real=real_save, **k):
                if Path(filename).parent.name >= tmp_name:
                    raise SafetensorError(
                        "Error while serializing: I/O error: No space left on device (os error 28)"
                    )
                return _real(obj, filename, *a, **k)

            monkeypatch.setattr(ckpt, name, save)


def test_full_disk_stops_cleanly_and_keeps_the_previous_checkpoint(cli, tmp_path, monkeypatch):
    out = tmp_path / "run"
    fill_disk_at(monkeypatch, 8, "state")
    rc, stdout, err = cli("train", *SHORT, "--out", out)
    assert rc == 2, err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "No space left on device" in errors[0] and "Traceback" not in err, err[-2000:]
    root = out / "checkpoints"
    assert (root / "latest").read_text() == "step_00000004"
    assert ckpt.verify_checkpoint(root / "step_00000004")["step"] == 4
    assert not (root / "step_00000008").exists()
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl")] == [2, 4, 6, 8]  # rows already written
    assert (out / "config.toml").is_file()


@pytest.mark.parametrize("where", ["weights", "state"])
def test_full_disk_message_names_the_checkpoint_and_the_fix(cli, tmp_path, monkeypatch, where):
    out = tmp_path / "run"
    fill_disk_at(monkeypatch, 8, where)
    rc, stdout, err = cli("train", *SHORT, "--out", out)
    root = out / "checkpoints"
    assert ckpt.verify_checkpoint(root / "step_00000004")["step"] == 4  # this part holds today
    assert rc == 2 and "Traceback" not in err, err[-2000:]
    assert str(root / "step_00000008") in err and "free" in err and "space" in err, err[-2000:]
    assert not list(root.glob(".tmp_step_*")), "partial checkpoint left on the full disk"


# ----------------------------------------------------------------------------------------------------
# non-finite weights


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 4)
        self.b = nn.Linear(4, 2)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_checkpoint_with_non_finite_weights_is_never_written(tmp_path, bad):
    root = tmp_path / "checkpoints"
    model = Tiny()
    first = ckpt.save_checkpoint(root, 1, model, {"step": 1}, keep=3)
    before = sorted(p.name for p in root.iterdir())
    with torch.no_grad():
        model.b.weight[1, 2] = bad
    with pytest.raises(ckpt.CheckpointError, match=r"non-finite weights \(b\.weight\) at step 2"):
        ckpt.save_checkpoint(root, 2, model, {"step": 2}, keep=3)
    assert sorted(p.name for p in root.iterdir()) == before  # no step_2, no temporary directory
    assert (root / "latest").read_text() == first.name
    ckpt.verify_checkpoint(first)


def test_keep_last_k_and_latest_updated_last(tmp_path):
    root = tmp_path / "checkpoints"
    model = Tiny()
    for step in range(1, 6):
        path = ckpt.save_checkpoint(root, step, model, {"step": step}, keep=2)
        assert (root / "latest").read_text() == path.name
        assert sorted(p.name for p in root.glob("step_*")) == [
            f"step_{s:08d}" for s in range(max(1, step - 1), step + 1)
        ]
    assert not list(root.glob(".*tmp*"))
    loaded = Tiny()
    ckpt.load_weights(loaded, root / "step_00000005")
    assert all(
        torch.equal(a, b)
        for a, b in zip(loaded.state_dict().values(), model.state_dict().values(), strict=True)
    )
    assert ckpt.load_trainer_state(root / "step_00000005") == {"step": 5}
