"""The single-process side of evomoe.parallel: torchrun environment parsing, the no-op ``NoParallel``, and a
plain run that never touches torch.distributed (fast: no process group)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from evomoe.cli import check_resume_compatible
from evomoe.config import Config, ConfigError
from evomoe.parallel.base import NoParallel, make_parallel
from evomoe.parallel.env import WorldInfo, distributed_session, world_info

SRC = Path(__file__).resolve().parents[2] / "src"


def test_world_info_from_torchrun_environment():
    assert world_info({}) == WorldInfo(0, 1, 0) and not world_info({}).distributed
    info = world_info({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"})
    assert info == WorldInfo(3, 4, 1) and info.distributed
    with pytest.raises(ValueError, match="WORLD_SIZE"):
        world_info({"WORLD_SIZE": "two"})
    with pytest.raises(ValueError, match="inconsistent"):
        world_info({"RANK": "2", "WORLD_SIZE": "2"})


def test_single_process_session_and_parallel_are_no_ops():
    with distributed_session({}) as info:
        assert info.world_size == 1
    assert not torch.distributed.is_initialized()
    par = make_parallel(Config(), {}, torch.device("cpu"))
    assert isinstance(par, NoParallel) and par.is_main
    x = torch.arange(6).view(3, 2)
    assert par.local_batch(x)[0] is x
    model = torch.nn.Linear(2, 2)
    assert par.wrap(model) is model


def test_expert_parallel_config_in_one_process_says_how_to_launch():
    cfg = Config()
    cfg.parallel.ep = 2
    with pytest.raises(ConfigError, match="torchrun --nproc_per_node 2"):
        make_parallel(cfg, {}, torch.device("cpu"))


def test_resume_may_change_the_parallel_layout():
    saved, new = Config(), Config()
    new.parallel.ep, new.parallel.dp_shard = 2, "fsdp"
    check_resume_compatible(saved, new)  # checkpoints store experts by global id


def test_single_process_run_never_touches_torch_distributed(tmp_path):
    """A plain training run (spawn step included) loads none of the distributed modules."""
    script = textwrap.dedent(
        f"""
        import sys
        from pathlib import Path
        import numpy as np
        import torch
        from evomoe.config import Config
        from evomoe.data.batches import TokenData
        from evomoe.data.tokenizer import ByteTokenizer
        from evomoe.train.trainer import Trainer

        cfg = Config()
        m = cfg.model
        m.d_model, m.n_layers, m.n_heads, m.seq_len, m.d_ff = 16, 1, 2, 8, 16
        cfg.moe.num_experts = 2
        cfg.evolve.diversify_steps = 1
        t = cfg.train
        t.steps, t.batch_size, t.log_every, t.eval_every, t.ckpt_every = 3, 2, 1, 3, 3
        t.eval_batches, t.device = 1, "cpu"
        rng = np.random.default_rng(0)
        tokens = lambda n: rng.integers(0, 256, n).astype(np.uint16)
        data = TokenData(tokens(500), tokens(200), ByteTokenizer(), {{}}, None)
        out = Path({str(tmp_path)!r})
        trainer = Trainer(cfg, out, env={{}}, log=lambda s: None, progress=False, data=data)
        trainer.run()
        assert trainer.model.spawned and trainer.fwd is trainer.model
        assert not torch.distributed.is_initialized()
        loaded = [m for m in ("comm", "wrap", "ep_dispatcher", "routing", "checkpoint")
                  if "evomoe.parallel." + m in sys.modules]
        assert not loaded, loaded
        """
    )
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["PYTHONPATH"] = f"{SRC}{os.pathsep}{env.get('PYTHONPATH', '')}"
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-3000:]
