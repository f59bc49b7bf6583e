"""Translation (the paper's Transformer task): teacher-forced training on length-bucketed batches with
label smoothing; validation loss, then greedy and beam-search decoding scored with BLEU and chrF
(sacrebleu). The pairs: a generated transduction, a verse-aligned Bible (``sword:``), or two line-aligned
files (``data.mt_data``), with one BPE over both languages.

Padding is masked everywhere: attention (key masks), routing (``RouterContext.valid_T``: padding is
neither routed nor counted in aux losses) and the loss (target -100). The decoded validation sentences of
each evaluation are written to ``<out>/translations/step_<step>.jsonl``, next to ``eval.jsonl``.
Legend: B batch, S source length, T target length, V vocabulary.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import check
from ..data.bucketing import fixed_batches, make_buckets, pair_batch, sample_indices
from ..data.mt_data import MTData, load_mt_data
from ..models.decoding import translate_batch
from ..registry import TASKS
from .base import Batch, EvalContext, Task
from .seq_metrics import IGNORE, label_smoothed_loss, nll_and_correct, norm_rows, translation_scores


@dataclass
class MTOptions:
    source: str = "synthetic"  # synthetic | sword:MODULE | a text file (line i translates target line i)
    target: str = ""  # the target file, or sword:MODULE ("" for synthetic)
    synthetic_pairs: int = 20000
    synthetic_seed: int = 0
    synthetic_words: int = 32  # words per language of the generated lexicon
    synthetic_max_words: int = 8  # longest generated sentence (shortest: 2 words)
    val_fraction: float = 0.02  # share of pairs held out (by a hash of the source line)
    label_smoothing: float = 0.1
    buckets: int = 8  # length buckets of the training pairs
    beam: int = 4
    length_penalty: float = 1.0  # beam score / length ** length_penalty
    # validation sentences decoded (greedy and beam) and scored at each evaluation: the first N; 0: the
    # whole validation split; -1: none (the validation loss only)
    eval_sentences: int = 64

    def validate(self, cfg: Any, prefix: str) -> None:
        checks = [
            (0.0 < self.val_fraction < 1.0, "val_fraction", self.val_fraction, "must be in (0, 1)"),
            (0.0 <= self.label_smoothing < 1.0, "label_smoothing", self.label_smoothing, "must be in [0, 1)"),
            (self.buckets >= 1, "buckets", self.buckets, "must be >= 1"),
            (self.beam >= 1, "beam", self.beam, "must be >= 1"),
            (self.length_penalty >= 0.0, "length_penalty", self.length_penalty, "must be >= 0"),
            (self.eval_sentences >= -1, "eval_sentences", self.eval_sentences, "must be >= 0, or -1 (none)"),
            (self.synthetic_pairs >= 2, "synthetic_pairs", self.synthetic_pairs, "must be >= 2"),
            (self.synthetic_words >= 2, "synthetic_words", self.synthetic_words, "must be >= 2"),
            (self.synthetic_max_words >= 2, "synthetic_max_words", self.synthetic_max_words, "must be >= 2"),
            (bool(self.source), "source", self.source, "must be 'synthetic', 'sword:MODULE' or a file"),
        ]
        for ok, name, value, why in checks:
            check(ok, f"{prefix}.{name}", value, why)


def pair_to_batch(b) -> Batch:
    targets = b.tgt_out_BT.masked_fill(~b.tgt_valid_BT, IGNORE)
    inputs = {
        "src_BS": b.src_BS,
        "tgt_BT": b.tgt_in_BT,
        "src_valid_BS": b.src_valid_BS,
        "tgt_valid_BT": b.tgt_valid_BT,
    }
    targets_ = {"targets_BT": targets, "norm_B": norm_rows(targets)}
    return Batch(inputs, targets_, int(b.src_valid_BS.sum() + b.tgt_valid_BT.sum()))


@TASKS.register("mt")
class MTTask(Task):
    Options = MTOptions
    model_kinds = ("encdec",)
    default_model = "encdec"
    fixed_shapes = False  # batches are padded to their longest pair
    metric_names = ("val_loss", "val_ppl", "bleu", "chrf", "bleu_greedy", "chrf_greedy", "bleu_signature",
                    "chrf_signature", "eval_sentences")  # fmt: skip
    headline = (
        ("val_loss", "validation loss", ".4f"),
        ("bleu", "BLEU (beam)", ".2f"),
        ("chrf", "chrF (beam)", ".2f"),
        ("bleu_greedy", "BLEU (greedy)", ".2f"),
    )

    def __init__(self, cfg: Any, env: Any, log: Callable[[str], None], data: MTData | None = None) -> None:
        super().__init__(cfg, env, log)
        o = self.opts
        self.data = data or load_mt_data(
            o.source, o.target, synthetic=(o.synthetic_pairs, o.synthetic_words, o.synthetic_max_words,
                                           o.synthetic_seed),
            val_fraction=o.val_fraction, max_tokens=cfg.model.seq_len, data=cfg.data, env=env or {}, log=log,
        )  # fmt: skip
        self.tokenizer = self.data.tokenizer
        lengths = np.array(
            [max(len(s), len(t) + 1) for s, t in zip(self.data.train_src, self.data.train_tgt)]
        )
        self.buckets = make_buckets(lengths, o.buckets)
        self.pass_tokens = sum(len(s) + len(t) + 1 for s, t in zip(self.data.train_src, self.data.train_tgt))

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    def _pairs(self, src, tgt, index):
        tok = self.tokenizer
        return pair_batch(src, tgt, index, tok.pad_id, tok.bos_id, tok.eos_id)

    def train_batch(self, step: int) -> Batch:
        t = self.cfg.train
        index = sample_indices(self.buckets, t.seed, step, t.batch_size)
        return pair_to_batch(self._pairs(self.data.train_src, self.data.train_tgt, index))

    def val_batches(self) -> list[Batch]:
        lengths = np.array([len(s) for s in self.data.val_src])
        index = fixed_batches(lengths, self.cfg.train.batch_size, self.cfg.train.eval_batches)
        return [pair_to_batch(self._pairs(self.data.val_src, self.data.val_tgt, i)) for i in index]

    def loss(self, out: Any, batch: Batch) -> torch.Tensor:
        logits = out.logits.reshape(-1, out.logits.shape[-1])
        total, _ = label_smoothed_loss(
            logits, batch.targets["targets_BT"].reshape(-1), self.opts.label_smoothing
        )
        return total / batch.targets["norm_B"].sum().float()  # the global batch's mean (``norm_rows``)

    def evaluate(self, ctx: EvalContext) -> dict[str, float]:
        nll, n = 0.0, 0.0
        for batch in self.val_batches():
            out, local = ctx.forward(batch)
            V = out.logits.shape[-1]
            s, _, k = nll_and_correct(out.logits.reshape(-1, V), local.targets["targets_BT"].reshape(-1))
            nll, n = nll + s, n + k
        nll, n = ctx.sum_over_ranks([nll, n])
        loss = nll / max(n, 1.0)
        row = {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0))}
        if self.opts.eval_sentences != -1:
            row.update(self.decode_and_score(ctx))
        return row

    def decode(self, model, gate, index: np.ndarray, device: torch.device, beam: int, all_steps: bool):
        """Greedy (beam 1) or beam-search translations of validation pairs ``index``, detokenized."""
        tok, b = self.tokenizer, self._pairs(self.data.val_src, self.data.val_tgt, index)
        src, valid = b.src_BS.to(device), b.src_valid_BS.to(device)
        ids = translate_batch(
            model, src, valid, gate, tok.bos_id, tok.eos_id, self.cfg.model.seq_len - 1, beam,
            self.opts.length_penalty, all_steps,
        )  # fmt: skip
        return [tok.decode(np.asarray(s, dtype=np.int64)).strip() for s in ids]

    @torch.no_grad()
    def decode_and_score(self, ctx: EvalContext) -> dict[str, float]:
        """BLEU and chrF of greedy and beam translations of the first ``eval_sentences`` validation pairs
        (0: all), their sacrebleu signatures and the number of sentences scored.
        Every rank decodes the same sentences; with several ranks (expert parallelism: each step is a
        collective) every rank runs the full ``seq_len - 1`` steps so that all stay in step."""
        n = len(self.data.val_src)
        n = min(self.opts.eval_sentences, n) if self.opts.eval_sentences > 0 else n
        all_steps = ctx.sum_over_ranks([1.0])[0] > 1
        refs, hyps = self.data.val_ref_text[:n], {"greedy": [], "beam": []}
        for start in range(0, n, self.cfg.train.batch_size):
            idx = np.arange(start, min(n, start + self.cfg.train.batch_size))
            hyps["greedy"] += self.decode(ctx.model, ctx.gate, idx, ctx.device, 1, all_steps)
            hyps["beam"] += self.decode(ctx.model, ctx.gate, idx, ctx.device, self.opts.beam, all_steps)
        beam, greedy = translation_scores(hyps["beam"], refs), translation_scores(hyps["greedy"], refs)
        if ctx.out_dir is not None and ctx.is_main:
            write_translations(Path(ctx.out_dir), ctx.step, self.data.val_src_text[:n], refs, hyps)
        return {"bleu": beam["bleu"], "chrf": beam["chrf"], "bleu_greedy": greedy["bleu"],
                "chrf_greedy": greedy["chrf"], "bleu_signature": beam["bleu_signature"],
                "chrf_signature": beam["chrf_signature"], "eval_sentences": n}  # fmt: skip

    def token_counts(self) -> torch.Tensor:
        ids = np.concatenate(self.data.train_src + self.data.train_tgt)
        special = [self.tokenizer.bos_id, self.tokenizer.eos_id]  # the decoder reads <s>; </s> is a target
        counts = np.bincount(np.concatenate([ids, np.repeat(special, len(self.data.train_tgt))]),
                             minlength=self.vocab_size)  # fmt: skip
        return torch.from_numpy(counts[: self.vocab_size].astype(np.int64))

    def passes(self, tokens: int) -> float:
        """Over the training pairs' source + target tokens (``<s>`` on the decoder side included)."""
        return tokens / max(self.pass_tokens, 1)

    def provenance(self) -> dict[str, Any]:
        m = self.data.meta
        files = m.get("files", {})
        return {
            "corpus": m.get("origin"),
            "content_sha256": files.get("pairs.npz", {}).get("sha256"),
            "tokenizer_sha256": files.get("tokenizer.json", {}).get("sha256"),
            "tokens": {"train": m.get("train"), "val": m.get("val")},
        }

    def forward_dense_flops(self, batch: Batch) -> float:
        """Forward FLOPs outside the FFNs, over the padded shapes actually computed: encoder projections and
        scores; decoder self-attention, cross-attention (queries, the memory's keys/values, scores) and the
        output projection."""
        m = self.cfg.model
        D, L, V = m.d_model, m.n_layers, m.vocab_size
        B, S = batch.inputs["src_BS"].shape
        T = batch.inputs["tgt_BT"].shape[1]
        enc = B * S * (8 * D * D * L + 4 * D * S * L)
        cross_kv = B * S * 4 * D * D * L
        dec = B * T * (8 * D * D * L + 4 * D * (T + 1) / 2 * L + 4 * D * D * L + 4 * D * S * L + 2 * D * V)
        return float(enc + cross_kv + dec)


def write_translations(out_dir: Path, step: int, sources, refs, hyps: dict[str, list[str]]) -> Path:
    """One JSON line per decoded validation sentence: source, reference, greedy and beam output."""
    path = out_dir / "translations" / f"step_{step:06d}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [
        json.dumps({"source": s, "reference": r, "greedy": g, "beam": b}, ensure_ascii=False)
        for s, r, g, b in zip(sources, refs, hyps["greedy"], hyps["beam"])
    ]
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return path
