"""Translation decoding: the encoder memory's cross-attention keys/values computed once per sentence (the
default) vs recomputed at every decoding step (the reference), greedy and beam search.

    python benchmarks/decode.py [--quick] [--threads N] [--rounds N] [--preset default-mt]

The model is the preset's encoder-decoder (default-mt: d_model 128, 3 + 3 blocks, 4 experts per FFN,
spawned and routed hard top-1, BPE vocab 4004) with random weights; the sources are random token ids of
the lengths of a validation batch (``--sentences``, lengths spread over 10-60). Both variants run the
same number of steps (``all_steps``: every sentence decodes ``--steps`` tokens, as if none ended), so the
ratio is per decoding step. Outputs are checked equal before timing. Ratios are per-round medians of
reference time / cached time, the variants interleaved (``common.interleaved``).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import torch  # noqa: E402

from evomoe.config import load_config  # noqa: E402
from evomoe.evolve import fresh_experts  # noqa: E402
from evomoe.models.decoding import translate_batch  # noqa: E402
from evomoe.models.encdec import EncoderDecoder  # noqa: E402
from evomoe.moe.router import GateState  # noqa: E402

VOCAB = 4004


def main() -> None:
    p = common.base_parser(__doc__.splitlines()[0])
    p.add_argument("--preset", default="default-mt")
    p.add_argument("--sentences", type=int, default=32, help="sentences per batch")
    p.add_argument("--steps", type=int, default=40, help="decoding steps per sentence")
    p.add_argument("--beams", default="1,4", help="beam sizes (1: greedy)")
    args = p.parse_args()
    device = common.setup(args)
    rounds = args.rounds or (3 if args.quick else 5)
    steps = 12 if args.quick else args.steps
    cfg = load_config(args.preset)
    cfg.model.vocab_size = VOCAB
    torch.manual_seed(0)
    model = EncoderDecoder(cfg.model, cfg.moe)
    if cfg.moe.enabled:
        counts = torch.ones(VOCAB, dtype=torch.long)
        fresh_experts(model, cfg, torch.Generator().manual_seed(0), vocab_size=VOCAB, token_counts=counts)
    model = model.to(device).eval()  # after the spawn: its new routers are modules too
    gate = GateState(tau=cfg.gate.tau_min, hard=True, step=cfg.train.steps)
    g = torch.Generator().manual_seed(1)
    B, S = args.sentences, 60
    lengths = torch.linspace(10, S, B).long()
    valid = (torch.arange(S)[None, :] < lengths[:, None]).to(device)
    src = torch.randint(4, VOCAB, (B, S), generator=g).to(device).masked_fill(~valid, 0)
    rows = []
    for beam in [int(b) for b in args.beams.split(",")]:

        def run(cache: bool, beam=beam):
            with torch.no_grad():
                return translate_batch(
                    model, src, valid, gate, 1, 2, steps, beam, 1.0, all_steps=True, cache_memory=cache
                )

        assert run(True) == run(False), "cached and reference decoding differ"
        t = common.interleaved(
            {"reference": lambda: run(False), "cached": lambda: run(True)}, device, rounds, baseline="cached"
        )
        ref = t["reference"]
        rows.append({
            "search": "greedy" if beam == 1 else f"beam {beam}",
            "sentences": B,
            "steps": steps,
            "cached ms": t["cached"]["ms"],
            "reference ms": ref["ms"],
            "speedup": ref["ratio"],
            "cpu speedup": ref["cpu_ratio"],
            "spread": ref["spread"],
            "loadavg": common.loadavg(),
        })  # fmt: skip
    cols = ["search", "sentences", "steps", "cached ms", "reference ms", "speedup", "cpu speedup", "spread",
            "loadavg"]  # fmt: skip
    table = common.print_table(rows, cols, f"decoding, {args.preset}: reference / cached (per round)")
    common.write_json("decode", args, device, {"rows": rows, "table": table})


if __name__ == "__main__":
    main()
