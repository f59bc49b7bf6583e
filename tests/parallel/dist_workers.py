"""Functions that run inside the gloo processes of the distributed tests (see ``dist_harness``)."""

from __future__ import annotations

import torch
import torch.distributed as dist

from evomoe.config import Config
from evomoe.evolve import spawn_model
from evomoe.models import GPT
from evomoe.moe.router import GateState
from evomoe.parallel.env import WorldInfo
from evomoe.parallel.wrap import Parallel
from evomoe.registry import ROUTERS
from evomoe.tasks.lm import lm_forward

ATOL = 1e-5


def tiny_cfg(router: str = "dts", ep: int = 2, **router_opts) -> Config:
    cfg = Config()
    m = cfg.model
    m.vocab_size, m.d_model, m.n_layers, m.n_heads, m.seq_len, m.d_ff = 64, 32, 2, 2, 16, 32
    cfg.moe.num_experts = 4
    cfg.router.name = router
    cfg.router.gate_init = "normal"  # peaked routing from the start: experts see different token counts
    for key, value in router_opts.items():
        section, field = key.split("__")
        setattr(getattr(cfg.router, section), field, value)
    cfg.evolve.noise = 0.2  # distinct experts, so a token sent to the wrong one would show
    cfg.train.batch_size = 4
    cfg.parallel.ep = ep
    return cfg


def build(cfg: Config, par: Parallel | None):
    """The model as the trainer builds it at the spawn step: same seeds, same RNG draws."""
    torch.manual_seed(0)
    model = GPT(cfg.model, cfg.moe)
    gen = torch.Generator().manual_seed(17)
    info = {"vocab_size": cfg.model.vocab_size}
    if "token_counts" in ROUTERS.get(cfg.router.name).needs:  # what the trainer gives from the task
        info["token_counts"] = torch.arange(cfg.model.vocab_size, 0, -1)
    if par is None:
        spawn_model(model, cfg, gen, **info)
        return model, model
    fwd = par.wrap(model)
    par.spawn_model(model, cfg, gen, info)
    return model, fwd


def check(name: str, got: torch.Tensor, want: torch.Tensor) -> None:
    err = (got.detach().float() - want.detach().float()).abs().max().item() if got.numel() else 0.0
    assert got.shape == want.shape and err <= ATOL, (
        f"{name}: shape {tuple(got.shape)} vs {tuple(want.shape)}, err {err}"
    )


def grad_of(p: torch.Tensor) -> torch.Tensor:
    return p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad  # FSDP: a sharded DTensor


def equivalence(rank: int, world: int, cases: list[tuple[str, dict, dict, dict]]) -> None:
    """EP over ``world`` processes vs one process on the same global batch: logits, loss, aux, gradients."""
    for router, opts, gate, parallel in cases:
        cfg = tiny_cfg(router, ep=world, **opts)
        for key, value in parallel.items():
            setattr(cfg.parallel, key, value)
        B, S = cfg.train.batch_size, cfg.model.seq_len
        g = torch.Generator().manual_seed(5)
        x = torch.randint(0, cfg.model.vocab_size, (B, S), generator=g)
        y = torch.randint(0, cfg.model.vocab_size, (B, S), generator=g)
        state = GateState(**gate)

        ref, _ = build(cfg, None)
        torch.manual_seed(123)  # the Gumbel noise of this step
        out_ref = lm_forward(ref, x, y, gate=state)
        (out_ref.loss + out_ref.aux_loss).backward()
        clip_ref = torch.nn.utils.clip_grad_norm_([p for p in ref.parameters() if p.grad is not None], 0.5)

        par = Parallel(cfg, WorldInfo(rank, world, rank), torch.device("cpu"))
        model, fwd = build(cfg, par)
        xl, yl = par.local_batch(x, y)
        torch.manual_seed(123)
        out = lm_forward(fwd, xl, yl, gate=state)
        (out.loss + out.aux_loss).backward()
        par.sync_grads(model)
        clip = par.clip_grad_norm(model, [p for p in model.parameters() if p.grad is not None], 0.5)

        tag = f"{router} {opts} {gate} {parallel}"
        rows = slice(rank * B // world, (rank + 1) * B // world)
        check(f"{tag} logits", out.logits, out_ref.logits[rows])
        loss = out.loss.detach().clone()
        dist.all_reduce(loss)
        check(f"{tag} loss", loss / world, out_ref.loss)
        for k in out_ref.aux:
            check(f"{tag} aux {k}", out.aux[k], out_ref.aux[k])
        check(f"{tag} grad norm", clip, clip_ref)
        ref_params = dict(ref.named_parameters())
        n_local = cfg.moe.num_experts // par.ep
        for pname, p in model.named_parameters():
            want = ref_params[pname].grad
            if id(p) in par.sharded:
                want = want[par.ep_rank * n_local : (par.ep_rank + 1) * n_local]
            assert (p.grad is None) == (want is None), f"{tag} {pname}: gradient presence differs"
            if want is not None:
                check(f"{tag} grad {pname}", grad_of(p), want)
        layout_roundtrip(tag, cfg, par, model, ref)


def layout_roundtrip(tag: str, cfg: Config, par: Parallel, model, ref) -> None:
    """Gathered weights equal the single-process model's; a fresh sharded model loads them back."""
    import tempfile  # noqa: PLC0415
    from pathlib import Path  # noqa: PLC0415

    from evomoe.parallel.checkpoint import load_weights  # noqa: PLC0415
    from evomoe.train.checkpoint import save_checkpoint  # noqa: PLC0415

    full = par.full_state_dict(model)
    for name, want in ref.state_dict().items():
        check(f"{tag} gathered {name}", full[name], want)
    root = Path(tempfile.mkdtemp()) if dist.get_rank() == 0 else None
    if root is not None:
        save_checkpoint(root, 1, model, {}, 1, full)
    path = [None if root is None else str(root / "step_00000001")]
    dist.broadcast_object_list(path)
    fresh_par = Parallel(cfg, WorldInfo(dist.get_rank(), dist.get_world_size()), torch.device("cpu"))
    fresh, _ = build(cfg, fresh_par)
    with torch.no_grad():
        for p in fresh.parameters():
            p.add_(1.0)
    load_weights(fresh, Path(path[0]), fresh_par)
    reloaded = fresh_par.full_state_dict(fresh)
    for name, want in ref.state_dict().items():
        check(f"{tag} reloaded {name}", reloaded[name], want)


# ---------------------------------------------------------------------------------------------- trainer runs
def synthetic_data(vocab: int = 64, n_train: int = 6000, n_val: int = 1500):
    import numpy as np  # noqa: PLC0415

    from evomoe.data.batches import TokenData  # noqa: PLC0415
    from evomoe.data.tokenizer import ByteTokenizer  # noqa: PLC0415

    rng = np.random.default_rng(0)
    train = rng.integers(0, vocab, n_train).astype(np.uint16)
    val = rng.integers(0, vocab, n_val).astype(np.uint16)
    return TokenData(train, val, ByteTokenizer(), {"text_bytes": {}, "tokens": {}}, cache_dir=None)


def train_cfg(ep: int, dp_shard: str = "ddp") -> Config:
    cfg = tiny_cfg("dts", ep=ep)
    cfg.parallel.dp_shard = dp_shard
    cfg.model.vocab_size = 256
    g, e, t = cfg.gate, cfg.evolve, cfg.train
    e.diversify_steps = 3  # dense steps 0..2, spawn at step 3
    g.decay_steps, g.hard_after = 2, 3  # soft phase at steps 3..5, hard from step 6
    t.steps, t.warmup_steps, t.log_every, t.eval_every, t.ckpt_every, t.keep_checkpoints = 8, 2, 2, 4, 4, 3
    t.eval_batches, t.device = 1, "cpu"
    return cfg


def run_trainer(cfg: Config, out, env: dict, resume_from=None):
    from evomoe.train.trainer import Trainer  # noqa: PLC0415

    out.mkdir(parents=True, exist_ok=True)
    trainer = Trainer(cfg, out, env=env, log=lambda s: None, progress=False, data=synthetic_data())
    if resume_from is not None:
        trainer.restore(resume_from)
    trainer.run()
    return trainer


def weights_of(trainer) -> dict[str, torch.Tensor]:
    full = trainer.par.full_state_dict(trainer.model)
    return full if full is not None else trainer.model.state_dict()


def check_weights(tag: str, got: dict, want: dict, atol: float) -> None:
    for name, w in got.items():
        err = (w - want[name]).abs().max().item()
        assert err <= atol, f"{tag}: {name} differs by {err}"


def train_and_resume(rank: int, world: int, root: str) -> None:
    """One process vs ``world`` processes through the spawn step, and resume 1 -> world and world -> 1."""
    import json  # noqa: PLC0415
    import os  # noqa: PLC0415
    from pathlib import Path  # noqa: PLC0415

    env_of_rank = {
        k: os.environ[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    }
    root = Path(root)
    if rank == 0:  # the reference: one process, the same global batches
        single = run_trainer(train_cfg(ep=1), root / "single", {})
        want = single.model.state_dict()
    dist.barrier()

    par = run_trainer(train_cfg(ep=world), root / "ep", env_of_rank)
    got = weights_of(par)
    if rank == 0:
        check_weights("ep run vs one process", got, want, 1e-4)
        rows = [json.loads(line) for line in (root / "ep" / "metrics.jsonl").read_text().splitlines()]
        ref_rows = [json.loads(line) for line in (root / "single" / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows] == [r["step"] for r in ref_rows] == [2, 4, 6, 8]
        for r, ref in zip(rows, ref_rows, strict=True):
            for key in ("loss", "experts_per_token", "flops", "tokens", "grad_norm", "entropy"):
                assert abs(r[key] - ref[key]) <= 1e-4 * max(1.0, abs(ref[key])), (
                    r["step"],
                    key,
                    r[key],
                    ref[key],
                )
            assert r["tokens_per_expert"] == ref["tokens_per_expert"] or r["step"] <= 2
        assert rows[-1]["a2a_bytes_per_step"] > 0 and rows[-1]["a2a_seconds_per_step"] > 0
        assert "a2a_bytes_per_step" not in ref_rows[-1]  # a single process logs what it always logged
        ev, ref_ev = (
            json.loads((root / d / "eval.jsonl").read_text().splitlines()[-1]) for d in ("ep", "single")
        )
        assert abs(ev["val_loss"] - ref_ev["val_loss"]) < 1e-4

    # world -> 1: the ep checkpoint of step 4, resumed by one process
    if rank == 0:
        resumed = run_trainer(
            train_cfg(ep=1), root / "to_one", {}, root / "ep" / "checkpoints" / "step_00000004"
        )
        check_weights("resumed ep -> 1", resumed.model.state_dict(), want, 1e-4)
    dist.barrier()
    # 1 -> world, with FSDP2 for the dense parameters: the single-process checkpoint of step 4 on every rank
    step4 = root / "single" / "checkpoints" / "step_00000004"
    resumed = run_trainer(train_cfg(ep=world, dp_shard="fsdp"), root / "to_ep", env_of_rank, step4)
    got = weights_of(resumed)
    if rank == 0:
        check_weights("resumed 1 -> ep (fsdp)", got, want, 1e-4)


# ---------------------------------------------------------------------------------------------- one launch
def all_parts(rank: int, world: int, root: str, parts: dict) -> None:
    """Run each part (name -> (function, args)) in the same process group; a failing part leaves its
    traceback in ``root/<name>.rank<r>.fail`` for its test to report, and the next part still runs."""
    import traceback  # noqa: PLC0415
    from pathlib import Path  # noqa: PLC0415

    for name, (fn, args) in parts.items():
        try:
            fn(rank, world, *args)
        except Exception:  # noqa: BLE001 - reported by the part's test
            (Path(root) / f"{name}.rank{rank}.fail").write_text(traceback.format_exc())
        (Path(root) / f"{name}.rank{rank}.done").write_text("")
        dist.barrier()
