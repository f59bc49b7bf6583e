"""The translation task: teacher-forced training on length-bucketed batches with label smoothing;
validation loss, then greedy and beam-search decoding scored with BLEU and chrF (sacrebleu).

Padding is masked everywhere: attention (key masks), routing (``RouterContext.valid_T``: padding is
neither routed nor counted in aux losses) and the loss (target -100). The decoded validation sentences of
each evaluation are written to ``<out>/translations/step_<step>.jsonl``.
Legend: B batch, S source length, T target length, V vocabulary.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..config import Config, ConfigError
from ..data.bucketing import fixed_batches, make_buckets, pair_batch, sample_indices
from ..data.mt_data import MTData, load_mt_data
from ..models.decoding import beam_search, greedy_search
from .seq_metrics import IGNORE, label_smoothed_loss, nll_and_correct, translation_scores


@dataclass
class MTOptions:
    source: str = "synthetic"  # synthetic | sword:MODULE | a text file (line i translates target line i)
    target: str = ""  # the target file / sword:MODULE ("" for synthetic)
    synthetic_pairs: int = 20000
    synthetic_seed: int = 0
    synthetic_words: int = 32  # words per language of the generated lexicon
    synthetic_max_words: int = 8  # longest generated sentence (shortest: 2 words)
    val_fraction: float = 0.02  # share of pairs held out (by a hash of the source line)
    label_smoothing: float = 0.1
    buckets: int = 8  # length buckets of the training pairs
    beam: int = 4
    length_penalty: float = 1.0  # beam score / length ** length_penalty
    eval_sentences: int = 64  # validation sentences decoded (greedy and beam) at each evaluation


def validate_options(o: MTOptions) -> None:
    checks = [
        (0.0 < o.val_fraction < 1.0, "val_fraction", o.val_fraction, "must be in (0, 1)"),
        (0.0 <= o.label_smoothing < 1.0, "label_smoothing", o.label_smoothing, "must be in [0, 1)"),
        (o.buckets >= 1, "buckets", o.buckets, "must be >= 1"),
        (o.beam >= 1, "beam", o.beam, "must be >= 1"),
        (o.length_penalty >= 0.0, "length_penalty", o.length_penalty, "must be >= 0"),
        (o.eval_sentences >= 0, "eval_sentences", o.eval_sentences, "must be >= 0"),
        (o.synthetic_pairs >= 2, "synthetic_pairs", o.synthetic_pairs, "must be >= 2"),
        (o.synthetic_words >= 2, "synthetic_words", o.synthetic_words, "must be >= 2"),
        (o.synthetic_max_words >= 2, "synthetic_max_words", o.synthetic_max_words, "must be >= 2"),
    ]
    for ok, name, value, why in checks:
        if not ok:
            raise ConfigError(f"task.mt.{name} = {value!r}: {why}")


def to_device(batch, device: torch.device) -> dict[str, torch.Tensor]:
    return {
        "src": batch.src_BS.to(device), "src_valid": batch.src_valid_BS.to(device),
        "tgt_in": batch.tgt_in_BT.to(device), "tgt_valid": batch.tgt_valid_BT.to(device),
        "targets": batch.tgt_out_BT.masked_fill(~batch.tgt_valid_BT, IGNORE).to(device),
    }  # fmt: skip


class MTTask:
    name = "mt"
    model_kinds = ("encdec",)

    def __init__(
        self, cfg: Config, opts: MTOptions, env: Mapping[str, str] = os.environ, log: Callable = print,
        data: MTData | None = None,
    ) -> None:  # fmt: skip
        validate_options(opts)
        self.cfg, self.opts = cfg, opts
        self.data = data or load_mt_data(
            opts.source, opts.target, synthetic=(opts.synthetic_pairs, opts.synthetic_words,
                                                 opts.synthetic_max_words, opts.synthetic_seed),
            val_fraction=opts.val_fraction, max_tokens=cfg.model.seq_len, data=cfg.data, env=env, log=log,
        )  # fmt: skip
        self.tokenizer = self.data.tokenizer
        lengths = np.array(
            [max(len(s), len(t) + 1) for s, t in zip(self.data.train_src, self.data.train_tgt)]
        )
        self.buckets = make_buckets(lengths, opts.buckets)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    def _batch(self, src, tgt, index):
        tok = self.tokenizer
        return pair_batch(src, tgt, index, tok.pad_id, tok.bos_id, tok.eos_id)

    def train_batch(self, step: int, seed: int) -> dict[str, torch.Tensor]:
        index = sample_indices(self.buckets, seed, step, self.cfg.train.batch_size)
        return to_device(self._batch(self.data.train_src, self.data.train_tgt, index), torch.device("cpu"))

    def loss(self, out, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = out.logits.reshape(-1, out.logits.shape[-1])
        total, n = label_smoothed_loss(logits, batch["targets"].reshape(-1), self.opts.label_smoothing)
        return total / n.clamp_min(1)

    def val_index_batches(self) -> list[np.ndarray]:
        lengths = np.array([len(s) for s in self.data.val_src])
        return fixed_batches(lengths, self.cfg.train.batch_size, self.cfg.train.eval_batches)

    @torch.no_grad()
    def evaluate(self, model, gate, device: torch.device, autocast=None, out_dir: Path | None = None,
                 step: int = 0) -> dict[str, float]:  # fmt: skip
        nll, correct, n, pairs, tokens = 0.0, 0, 0, 0.0, 0
        for index in self.val_index_batches():
            inputs = to_device(self._batch(self.data.val_src, self.data.val_tgt, index), device)
            with autocast() if autocast else torch.no_grad():
                out = model(inputs, gate)
            s, c, k = nll_and_correct(
                out.logits.reshape(-1, out.logits.shape[-1]), inputs["targets"].reshape(-1)
            )
            nll, correct, n = nll + s, correct + c, n + k
            if out.stats:
                pairs += sum(float(st.pairs) / float(st.tokens) for st in out.stats) / len(out.stats) * k
            tokens += k
        loss = nll / max(n, 1)
        row = {
            "val_loss": loss,
            "val_ppl": math.exp(min(loss, 50.0)),
            "val_token_accuracy": correct / max(n, 1),
            "experts_per_token": pairs / max(tokens, 1),
        }
        if self.opts.eval_sentences:
            row.update(self.decode_and_score(model, gate, device, out_dir, step))
        return row

    def decode(self, model, gate, src_idx: np.ndarray, device: torch.device, beam: int) -> list[str]:
        tok = self.tokenizer
        b = self._batch(self.data.val_src, self.data.val_tgt, src_idx)
        src, valid = b.src_BS.to(device), b.src_valid_BS.to(device)
        max_len = self.cfg.model.seq_len - 1
        if beam == 1:
            state = model.start_decoding(src, valid, gate)
            ids = greedy_search(model.decode_step, state, len(src_idx), tok.bos_id, tok.eos_id, max_len)
        else:
            state = model.start_decoding(src, valid, gate, repeat=beam)
            ids = beam_search(
                model.decode_step, model.reorder_state, state, len(src_idx), tok.bos_id, tok.eos_id, max_len,
                beam=beam, alpha=self.opts.length_penalty,
            )  # fmt: skip
        return [tok.decode(np.asarray(s, dtype=np.int64)).strip() for s in ids]

    def decode_and_score(self, model, gate, device, out_dir: Path | None, step: int) -> dict[str, float]:
        n = min(self.opts.eval_sentences, len(self.data.val_src))
        refs = self.data.val_ref_text[:n]
        hyps = {"greedy": [], "beam": []}
        for start in range(0, n, self.cfg.train.batch_size):
            idx = np.arange(start, min(n, start + self.cfg.train.batch_size))
            hyps["greedy"] += self.decode(model, gate, idx, device, beam=1)
            hyps["beam"] += self.decode(model, gate, idx, device, beam=self.opts.beam)
        beam, greedy = translation_scores(hyps["beam"], refs), translation_scores(hyps["greedy"], refs)
        if out_dir is not None:
            write_translations(Path(out_dir), step, self.data.val_src_text[:n], refs, hyps)
        return {"bleu": beam["bleu"], "chrf": beam["chrf"], "bleu_greedy": greedy["bleu"],
                "chrf_greedy": greedy["chrf"]}  # fmt: skip

    def token_counts(self) -> torch.Tensor:
        ids = np.concatenate(self.data.train_src + self.data.train_tgt)
        special = [self.tokenizer.bos_id, self.tokenizer.eos_id]  # the decoder reads <s>; </s> is a target
        counts = np.bincount(np.concatenate([ids, np.repeat(special, len(self.data.train_tgt))]),
                             minlength=self.vocab_size)  # fmt: skip
        return torch.from_numpy(counts[: self.vocab_size].astype(np.int64))

    def dense_flops_per_token(self, model_cfg) -> float:
        """Forward FLOPs per (source or target) token outside the FFNs, at the mean sentence lengths:
        encoder projections and scores, decoder self- and cross-attention, the output projection."""
        D, L, V = model_cfg.d_model, model_cfg.n_layers, self.vocab_size
        S = float(np.mean([len(s) for s in self.data.train_src]))
        T = float(np.mean([len(t) for t in self.data.train_tgt])) + 1
        enc = S * (8 * D * D * L + 4 * D * S * L) + S * 4 * D * D * L  # + cross-attention keys/values
        dec = T * (8 * D * D * L + 4 * D * (T + 1) / 2 * L + 4 * D * D * L + 4 * D * S * L + 2 * D * V)
        return (enc + dec) / (S + T)


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
