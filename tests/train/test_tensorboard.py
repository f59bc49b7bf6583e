"""``train.tensorboard = true``: loss, lr, temperature, experts per token, load CV and per-layer load
histograms land in RUN/tensorboard as the run goes."""

from __future__ import annotations

import pytest

pytest.importorskip("tensorboard")


def test_tensorboard_events(cli, tiny_args, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    rc, _, err = cli("train", *tiny_args, "--train.steps=24", "--train.tensorboard=true", "--out", out)
    assert rc == 0, err[-2000:]
    acc = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0, "histograms": 0})
    acc.Reload()
    tags = acc.Tags()
    for tag in ("train/loss", "train/lr", "train/temperature", "moe/experts_per_token", "moe/load_cv"):
        assert tag in tags["scalars"], tag
    assert len(acc.Scalars("train/loss")) == 24  # one per log line (log_every = 1)
    assert [e.step for e in acc.Scalars("train/temperature")][0] == 11  # logged from the spawn on
    assert "load/moe_layer_0" in tags["histograms"]
    hist = acc.Histograms("load/moe_layer_0")[-1].histogram_value
    assert hist.num == pytest.approx(1.0, abs=1e-4)  # the shares of one layer's pairs sum to 1
    assert "eval/val_loss" in tags["scalars"]
