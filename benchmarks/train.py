"""End-to-end training throughput and peak memory: GPT-MoE (top-1, top-2, each DTS phase) vs the dense GPT.

    python benchmarks/train.py [--quick] [--threads N] [--precision fp32|bf16] [--preset default]

One training step is the trainer's (``evomoe.train.trainer.Trainer.train_step`` minus data loading and
logging): forward with the step's gate state, LM loss + aux losses, backward, gradient clipping, AdamW,
``zero_grad(set_to_none=True)``, on synthetic token batches of the preset's shape. Variants share the
preset's model (quick and default: d_model 128, d_ff 256, 4 layers, E = 8, batch 16 x 128 = 2048 tokens):
``dense`` (moe.enabled = false, the same active parameters as top-1), ``dense-2x`` (d_ff x 2: top-2's),
``switch`` (top-1, dropless), ``gshard`` (top-2, dropless), and the DTS gate's phases: ``dts-diversify``
(one dense FFN per block, before the spawn), ``dts-sparsify`` (the soft phase at tau 2.0, 0.3 and 0.12:
about 8, 4 and 2 experts per token),
``dts-sparse`` (hard top-1). Steps are interleaved round by round; tokens/s ratios are per-round medians
against ``dense``. Target (issue): top-1 (switch, dts-sparse) >= 0.9 x dense tokens/s.

    python benchmarks/train.py --modes eager-fp32,compiled-fp32,compiled-bf16,compiled-bf16-fused \
        --threads-list 1,2

compares the trainer's step modes (``train.compile``, ``train.precision``; ``evomoe.train.compile``) for
each variant, interleaved in the same rounds, at each thread count in turn (one process); ratios are
per-round tokens/s against the same variant's ``eager-fp32``. It prints each mode's compile warm-up (the
first step), graphs, graph breaks and the frames recompiled after it.
"""

from __future__ import annotations

import copy
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import torch  # noqa: E402

from evomoe.config import load_config  # noqa: E402
from evomoe.evolve import fresh_experts  # noqa: E402
from evomoe.models import GPT  # noqa: E402
from evomoe.moe.router import GateState  # noqa: E402
from evomoe.tasks.lm import next_token_loss  # noqa: E402
from evomoe.train.compile import StepMode, compile_counts, graph_break_reasons  # noqa: E402
from evomoe.train.flops import training_flops  # noqa: E402
from evomoe.train.optim import build_optimizer  # noqa: E402

VOCAB = 4096


def variants(cfg) -> dict[str, tuple[object, GateState]]:
    """name -> (config, gate state of its steps)."""
    out = {}

    def make(name, gate=None, **changes):
        c = copy.deepcopy(cfg)
        for dotted, value in changes.items():
            obj = c
            *path, last = dotted.split("__")
            for part in path:
                obj = getattr(obj, part)
            setattr(obj, last, value)
        out[name] = (c, gate or GateState())

    make("dense", moe__enabled=False)
    make("dense-2x", moe__enabled=False, model__d_ff=2 * cfg.model.d_ff)
    make("switch", router__name="topk", router__topk__k=1, evolve__diversify_steps=0)
    make("gshard", router__name="topk", router__topk__k=2, evolve__diversify_steps=0)
    make("dts-diversify", router__name="dts")  # not spawned: a dense FFN per block through the MoE layer
    make(
        "dts-sparsify tau=2.0", GateState(tau=2.0, hard=False), router__name="dts", evolve__diversify_steps=0
    )
    make(
        "dts-sparsify tau=0.3", GateState(tau=0.3, hard=False), router__name="dts", evolve__diversify_steps=0
    )
    soft_2 = GateState(tau=0.12, hard=False)  # ~2 experts per token with this gate's init
    make("dts-sparsify tau=0.12", soft_2, router__name="dts", evolve__diversify_steps=0)
    make("dts-sparse", GateState(tau=0.3, hard=True), router__name="dts", evolve__diversify_steps=0)
    return out


class Runner:
    def __init__(
        self,
        cfg,
        gate: GateState,
        device: torch.device,
        precision: str,
        seed: int = 0,
        fused_adamw: bool = False,
        compiled: bool = False,
    ) -> None:
        torch.manual_seed(seed)
        cfg.model.vocab_size = VOCAB
        cfg.router.gate_init = "normal"  # a trained gate, not the all-equal zero init
        self.cfg, self.gate, self.device = cfg, gate, device
        self.model = GPT(cfg.model, cfg.moe).to(device)
        if cfg.moe.enabled and cfg.evolve.diversify_steps == 0:
            fresh_experts(self.model, cfg, torch.Generator().manual_seed(seed))
            self.model.to(device)
        # the trainer's optimizer: train.optimizer_impl = fused (one kernel per group) or foreach
        cfg.train.optimizer_impl = "fused" if fused_adamw else "foreach"
        self.opt = build_optimizer(self.model, cfg.train)
        self.mode = StepMode(compiled, precision, device, print, fresh=False)
        self.fwd, self.loss_fn = self.mode.wrap(self.model), self.mode.wrap(next_token_loss)
        B, S = cfg.train.batch_size, cfg.model.seq_len
        g = torch.Generator().manual_seed(seed)
        self.batches = [torch.randint(0, VOCAB, (B, S + 1), generator=g).to(device) for _ in range(4)]
        self.i = 0
        self.tokens_per_step = B * S
        self.pairs_per_token = 0.0

    def step(self) -> None:
        batch = self.batches[self.i % len(self.batches)]
        self.i += 1
        x, y = batch[:, :-1], batch[:, 1:]
        with self.mode.running():  # as in the trainer (deterministic algorithms in a compiled CPU run)
            with self.mode.autocast():
                out = self.fwd(x, gate=self.gate)
                out.loss = self.loss_fn(out.logits, y)
            loss = out.loss + out.aux_loss
            loss.backward()
        params = [p for p in self.model.parameters() if p.grad is not None]
        grad_norm = torch.nn.utils.clip_grad_norm_(params, self.cfg.train.grad_clip)
        if bool(torch.isfinite(loss) and torch.isfinite(grad_norm)):
            self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        if out.stats:
            self.pairs_per_token = sum(float(s.pairs) / float(s.tokens) for s in out.stats) / len(out.stats)
        self.last_stats = out.stats

    def step_flops(self) -> float:
        """Training FLOPs of one step as the trainer counts them (experts per computed pair)."""
        m, stats = self.cfg.model, self.last_stats
        tokens = self.tokens_per_step
        moe_pairs = sum(float(s.pairs) for s in stats)
        n_dense = m.n_layers - len(stats)
        routed = sum(float(s.tokens) for s in stats) if self.model.spawned else 0.0
        return training_flops(
            m, tokens, m.seq_len, moe_pairs + n_dense * tokens, routed, self.cfg.moe.num_experts
        )

    def steps(self, n: int):
        def run():
            for _ in range(n):
                self.step()

        return run

    def active_params(self) -> int:
        """Parameters one token uses: everything but the experts it is not routed to (mean over layers)."""
        total = sum(p.numel() for p in self.model.parameters())
        for layer in self.model.moe_layers():
            E = layer.experts.num_experts
            if E > 1:
                per_expert = (layer.experts.w1_EDH.numel() + layer.experts.w2_EFD.numel()) // E
                total -= round((E - max(self.pairs_per_token, 1.0)) * per_expert)
        return total


def main() -> None:
    p = common.base_parser(__doc__.splitlines()[0])
    p.add_argument("--preset", default="default", help="model shape (a preset name or TOML path)")
    p.add_argument("--precision", default="", help="fp32 | bf16 (several: comma-separated)")
    p.add_argument("--steps", type=int, default=0, help="steps per variant and round")
    p.add_argument("--impl", default="auto", help="moe.experts_impl of the MoE variants")
    p.add_argument(
        "--fused-adamw", action="store_true", help="train.optimizer_impl = fused instead of foreach"
    )
    p.add_argument(
        "--adamw-side-by-side",
        action="store_true",
        help="run every variant twice, foreach and fused AdamW (train.optimizer_impl), interleaved",
    )
    p.add_argument(
        "--variants", default="", help="comma-separated subset of the variants (dense always runs)"
    )
    p.add_argument("--peak-tflops", type=float, default=0.0, help="the device's peak (bf16) TFLOP/s, for MFU")
    p.add_argument("--compile", action="store_true", help="torch.compile each model's transformer blocks")
    p.add_argument(
        "--modes",
        default="",
        help="compare step modes: eager-fp32,compiled-fp32,compiled-bf16 (a suffix -fused: fused AdamW)",
    )
    p.add_argument("--threads-list", default="", help="with --modes: thread counts run in turn, e.g. 1,2")
    args = p.parse_args()
    device = common.setup(args)
    if args.modes:
        return compare_modes(args, device)
    rounds = args.rounds or (3 if args.quick else 5)
    n_steps = args.steps or (2 if args.quick else 4)
    precisions = (args.precision or ("fp32" if args.quick or device.type == "cpu" else "bf16")).split(",")
    base = load_config(args.preset)
    base.train.device = device.type
    base.moe.experts_impl = args.impl
    rows = []
    for precision in precisions:
        chosen = variants(base)
        if args.variants:
            keep = {"dense", *args.variants.split(",")}
            chosen = {k: v for k, v in chosen.items() if k in keep}
        runners = {
            name: Runner(c, gate, device, precision, fused_adamw=args.fused_adamw)
            for name, (c, gate) in chosen.items()
        }
        if args.adamw_side_by_side:  # each variant also with the fused AdamW, interleaved in the same rounds
            for name, (c, gate) in chosen.items():
                twin = Runner(copy.deepcopy(c), gate, device, precision, fused_adamw=True)
                runners[f"{name} +fused"] = twin
        if args.compile:  # the attention and norms compile; the MoE layer's data-dependent shapes stay eager
            for r in runners.values():
                for block in r.model.blocks:
                    block.attn.compile()
        fns = {name: r.steps(n_steps) for name, r in runners.items()}
        load0 = common.loadavg()
        res = common.interleaved(fns, device, rounds=rounds, warmup=1, baseline="dense")
        load1 = common.loadavg()
        for name, r in runners.items():
            peak = common.peak_bytes(r.steps(1), device) / 2**20
            tps = r.tokens_per_step * n_steps / (res[name]["ms"] / 1e3)
            target = 0.9 if name in ("switch", "dts-sparse") else None
            ratio = 1.0 / res[name]["ratio"]
            tflops = r.step_flops() * n_steps / (res[name]["ms"] / 1e3) / 1e12
            rows.append(
                {
                    "precision": precision,
                    "variant": name,
                    "experts/token": round(r.pairs_per_token, 2) if r.pairs_per_token else "-",
                    "active params (M)": r.active_params() / 1e6,
                    "tokens/s": tps,
                    "vs dense": ratio,
                    "cpu vs dense": 1.0 / res[name]["cpu_ratio"],
                    "ms/step": res[name]["ms"] / n_steps,
                    "peak MiB": peak,
                    "model TFLOP/s": tflops,
                    "MFU": tflops / args.peak_tflops if args.peak_tflops else "-",
                    "loadavg": f"{load0:.1f}-{load1:.1f}",
                    "target": "-" if target is None else f">={target}",
                    "met": "-" if target is None else ("yes" if ratio >= target else "no"),
                }
            )
    cols = [
        "precision",
        "variant",
        "experts/token",
        "active params (M)",
        "tokens/s",
        "vs dense",
        "cpu vs dense",
        "ms/step",
        "peak MiB",
        "model TFLOP/s",
        "MFU",
        "loadavg",
        "target",
        "met",
    ]
    m = base.model
    title = (
        f"GPT training steps ({args.preset}: d_model {m.d_model}, d_ff {m.d_ff}, {m.n_layers} layers, "
        f"E {base.moe.num_experts}, {base.train.batch_size}x{m.seq_len} tokens), {device}, "
        f"threads {torch.get_num_threads()}"
    )
    table = common.print_table(rows, cols, title)
    common.write_json("train", args, device, {"rows": rows, "table": table, "steps_per_round": n_steps})
    if any(r["met"] == "no" for r in rows):
        print("target missed:", [r["variant"] for r in rows if r["met"] == "no"])


MODE_VARIANTS = ("dense", "switch", "dts-sparsify tau=2.0", "dts-sparsify tau=0.12", "dts-sparse")


def compare_modes(args, device: torch.device) -> None:
    """Every variant in every mode, interleaved; ratios per round against the variant's first mode."""
    rounds, n_steps = args.rounds or (3 if args.quick else 5), args.steps or (2 if args.quick else 4)
    modes = args.modes.split(",")
    for mode in modes:
        kind, precision, *opt = mode.split("-")
        if (
            kind not in ("eager", "compiled")
            or precision not in ("fp32", "bf16")
            or opt not in ([], ["fused"])
        ):
            raise SystemExit(f"--modes: '{mode}' is not (eager|compiled)-(fp32|bf16)[-fused]")
    base = load_config(args.preset)
    base.train.device = device.type
    base.moe.experts_impl = args.impl
    names = args.variants.split(",") if args.variants else list(MODE_VARIANTS)
    chosen = {k: v for k, v in variants(base).items() if k in names}
    thread_counts = [int(t) for t in (args.threads_list or str(torch.get_num_threads())).split(",")]
    torch.set_num_threads(thread_counts[0])  # the thread count is in the compiled graphs' guards
    runners, warm = {}, {}
    for name, (c, gate) in chosen.items():
        for mode in modes:
            kind, precision, *opt = mode.split("-")  # e.g. compiled-bf16-fused: AdamW(fused=True)
            r = Runner(
                copy.deepcopy(c),
                gate,
                device,
                precision,
                compiled=kind == "compiled",
                fused_adamw=opt == ["fused"],
            )
            before, tic = compile_counts(), time.perf_counter()
            r.step()  # the compile warm-up
            warm[name, mode] = (time.perf_counter() - tic, before, compile_counts())
            runners[name, mode] = r
    after_warm, rows, tables = compile_counts(), [], []
    for threads in thread_counts:  # (a new count recompiles, in the warm-up round)
        torch.set_num_threads(threads)
        fns = {f"{n} | {m}": r.steps(n_steps) for (n, m), r in runners.items()}
        load0 = common.loadavg()
        res = common.interleaved(fns, device, rounds=rounds, warmup=1)
        load1 = common.loadavg()
        for (name, mode), r in runners.items():
            mine, ref = res[f"{name} | {mode}"], res[f"{name} | {modes[0]}"]
            ratios = [b / a for a, b in zip(mine["rounds_s"], ref["rounds_s"], strict=True)]
            cpu = [b / a for a, b in zip(mine["rounds_cpu_s"], ref["rounds_cpu_s"], strict=True)]
            seconds, c0, c1 = warm[name, mode]
            rows.append(
                {
                    "threads": threads,
                    "variant": name,
                    "mode": mode,
                    "experts/token": round(r.pairs_per_token, 2) if r.pairs_per_token else "-",
                    "tokens/s": r.tokens_per_step * n_steps / (mine["ms"] / 1e3),
                    f"vs {modes[0]}": statistics.median(ratios),
                    "spread": (max(ratios) - min(ratios)) / 2,
                    "cpu-time ratio": statistics.median(cpu),
                    "warm-up s": seconds,
                    "graphs": c1["graphs"] - c0["graphs"],
                    "breaks": c1["graph_breaks"] - c0["graph_breaks"],
                    "loadavg": f"{load0:.1f}-{load1:.1f}",
                }
            )
    m = base.model
    title = (
        f"training step modes ({args.preset}: d_model {m.d_model}, d_ff {m.d_ff}, {m.n_layers} layers, "
        f"E {base.moe.num_experts}, {base.train.batch_size}x{m.seq_len} tokens), {device}, "
        f"{rounds} rounds x {n_steps} steps"
    )
    tables.append(common.print_table(rows, list(rows[0]), title))
    counts = compile_counts()
    recompiled = counts["frames"] - after_warm["frames"]
    print(f"compile counters: {counts}; frames compiled after the warm-up steps (recompiles): {recompiled}")
    print(f"graph breaks: {'; '.join(graph_break_reasons()) or 'none'}")
    common.write_json(
        "train_modes",
        args,
        device,
        {"rows": rows, "table": tables[0], "counters": counts, "recompiled": recompiled},
    )


if __name__ == "__main__":
    main()
