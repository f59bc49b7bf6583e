"""Generation with a run's model, as its task asks (``evomoe generate``):

- a decoder (``lm``) continues the prompt: sampling (temperature, top-k; temperature 0 = greedy), the
  prompt fed once and then one token per step through a key-value cache; the reference (``cache=False``)
  re-decodes the whole sequence every step, and both pick the same tokens;
- an encoder-decoder (``mt``) translates the prompt with the translation task's own decoder (greedy or
  beam search with its length penalty, ``models.decoding.translate_batch``);
- a masked LM (``mlm``) fills each ``<mask>`` of ``<s>`` + the prompt from one forward pass (each masked
  position predicted from the unmasked text, independently), by argmax or by sampling as a decoder does.

Routing is the run's evaluation routing at its checkpoint (eval mode, the gate of its last step).
Legend: B batch, S positions, V vocabulary.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .data.tokenizer import MASK
from .models.decoding import translate_batch
from .models.hf.config import end_of_text_ids
from .models.layers import KVCache
from .moe.router import GateState


def sample_next(
    logits_BV: torch.Tensor, temperature: float, top_k: int = 0, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Next token ids [B]: argmax at temperature 0, else a draw from softmax(logits / T) over the top k."""
    if temperature < 0:
        raise ValueError(f"--temperature = {temperature}: must be >= 0 (0: greedy)")
    if temperature == 0:
        return logits_BV.argmax(-1)
    logits_BV = logits_BV.float() / temperature
    if top_k > 0:
        kth_B1 = logits_BV.topk(min(top_k, logits_BV.shape[-1]), dim=-1).values[:, -1:]
        logits_BV = logits_BV.masked_fill(logits_BV < kth_B1, float("-inf"))
    probs_BV = torch.softmax(logits_BV, dim=-1)
    return torch.multinomial(probs_BV, 1, generator=generator).squeeze(1)


@torch.no_grad()
def generate(
    model: nn.Module,
    prompt_BS: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int = 0,
    seed: int = 0,
    cache: bool = True,
    gate: GateState | None = None,
    stop_ids: Sequence[int] = (),
) -> torch.Tensor:
    """``prompt_BS`` followed by up to ``max_new_tokens`` generated ids. ``model``: an evomoe decoder (eval
    mode, so routing is deterministic); positions must fit ``model.cfg.seq_len``. Stops early once every row
    has emitted one of ``stop_ids`` (the end of text; a row that ended earlier runs on: cut it there)."""
    limit = model.cfg.seq_len
    if prompt_BS.shape[1] < 1:
        raise ValueError("the prompt encodes to no tokens: give a longer --prompt")
    if prompt_BS.shape[1] + max_new_tokens > limit:
        raise ValueError(
            f"prompt ({prompt_BS.shape[1]} tokens) + --max-new-tokens {max_new_tokens} exceeds "
            f"model.seq_len = {limit}"
        )
    was_training = model.training
    model.eval()
    gen = torch.Generator(device=prompt_BS.device).manual_seed(seed)
    kv = KVCache.empty(len(model.blocks)) if cache else None
    stop = torch.as_tensor(list(stop_ids), dtype=torch.long, device=prompt_BS.device)
    ended_B = torch.zeros(prompt_BS.shape[0], dtype=torch.bool, device=prompt_BS.device)
    seq_BS, feed_BS = prompt_BS, prompt_BS
    for _ in range(max_new_tokens):
        logits_BSV = model(feed_BS, gate=gate, cache=kv).logits if cache else model(seq_BS, gate=gate).logits
        next_B = sample_next(logits_BSV[:, -1], temperature, top_k, gen)
        seq_BS = torch.cat([seq_BS, next_B.unsqueeze(1)], dim=1)
        feed_BS = next_B.unsqueeze(1)
        ended_B |= torch.isin(next_B, stop)
        if bool(ended_B.all()):
            break
    model.train(was_training)
    return seq_BS


@torch.no_grad()
def fill_masks(
    model: nn.Module,
    ids_BS: torch.Tensor,
    mask_id: int,
    num_normal: int,
    temperature: float = 0.0,
    top_k: int = 0,
    seed: int = 0,
    gate: GateState | None = None,
) -> torch.Tensor:
    """``ids_BS`` with each ``mask_id`` replaced by a text id (< ``num_normal``: never a special token),
    chosen from the masked LM's logits at that position as :func:`sample_next` chooses."""
    logits_BSV = model(ids_BS, gate=gate).logits[..., :num_normal]
    masked_BS = ids_BS == mask_id
    gen = torch.Generator(device=ids_BS.device).manual_seed(seed)
    filled_BS = ids_BS.clone()
    filled_BS[masked_BS] = sample_next(logits_BSV[masked_BS], temperature, top_k, gen)
    return filled_BS


# ---------------------------------------------------------------------------------- evomoe generate


@dataclass
class Options:
    """The command's options; None = not given (each kind of run has its own defaults)."""

    max_new_tokens: int | None = None
    temperature: float | None = None
    top_k: int | None = None
    seed: int | None = None
    beam: int | None = None
    length_penalty: float | None = None


CHECKS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "max_new_tokens": (lambda v: v >= 1, "must be >= 1"),
    "temperature": (lambda v: math.isfinite(v) and v >= 0, "must be >= 0 (0: greedy)"),
    "top_k": (lambda v: v >= 0, "must be >= 0 (0: every token)"),
    "seed": (lambda v: v >= 0, "must be >= 0"),
    "beam": (lambda v: v >= 1, "must be >= 1 (1: greedy)"),
    "length_penalty": (lambda v: math.isfinite(v) and v >= 0, "must be >= 0"),
}


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_options(opts: Options) -> None:
    """ValueError naming the first option with an impossible value."""
    for name, (ok, why) in CHECKS.items():
        value = getattr(opts, name)
        if value is not None and not ok(value):
            raise ValueError(f"{flag(name)} = {value}: {why}")


@dataclass
class Generated:
    text: str
    prompt_ids: list[int]  # what the model read (a masked LM: <s> + the prompt, <mask> ids included)
    new_ids: list[int]  # generated (a masked LM: the id chosen for each <mask>, in order)


def continue_prompt(run: Any, prompt: str, o: Options) -> Generated:
    tok = run.tokenizer
    prompt_1S = torch.as_tensor(tok.encode(prompt), dtype=torch.long).unsqueeze(0)
    stop = end_of_text_ids(run.source)
    temperature = 0.8 if o.temperature is None else o.temperature
    ids = generate(
        run.model, prompt_1S, o.max_new_tokens or 64, temperature, o.top_k or 0, o.seed or 0,
        gate=run.gate, stop_ids=stop,
    )[0, prompt_1S.shape[1] :].tolist()  # fmt: skip
    text_ids = ids[: next((i for i, t in enumerate(ids) if t in stop), len(ids))]
    return Generated(prompt + tok.decode(text_ids), prompt_1S[0].tolist(), ids)


def translate_prompt(run: Any, prompt: str, o: Options) -> Generated:
    tok, m, mt = run.tokenizer, run.cfg.model, run.cfg.task.mt
    src = tok.encode(prompt.strip()).tolist()
    if not src:
        raise ValueError("the prompt encodes to no tokens: give a sentence to translate")
    if len(src) > m.seq_len:
        raise ValueError(
            f"the prompt is {len(src)} tokens; the source has at most model.seq_len = {m.seq_len} tokens"
        )
    limit = m.seq_len - 1
    if (o.max_new_tokens or 0) > limit:
        raise ValueError(
            f"--max-new-tokens = {o.max_new_tokens}: a translation has at most model.seq_len - 1 = "
            f"{limit} tokens"
        )
    src_1S = torch.tensor([src])
    alpha = mt.length_penalty if o.length_penalty is None else o.length_penalty
    ids = translate_batch(
        run.model, src_1S, torch.ones_like(src_1S, dtype=torch.bool), run.gate, tok.bos_id, tok.eos_id,
        o.max_new_tokens or limit, o.beam or mt.beam, alpha,
    )[0]  # fmt: skip
    return Generated(tok.decode(ids).strip(), src, ids)


def fill_prompt(run: Any, prompt: str, o: Options) -> Generated:
    tok, limit = run.tokenizer, run.cfg.model.seq_len
    if MASK not in prompt:
        raise ValueError(
            f"the prompt has no {MASK}: a masked-LM run fills them (e.g. --prompt 'def {MASK}(x):')"
        )
    ids = [tok.bos_id, *tok.encode_with_masks(prompt).tolist()]
    if len(ids) > limit:
        raise ValueError(f"the prompt is {len(ids)} tokens with <s>: more than model.seq_len = {limit}")
    ids_1S = torch.tensor([ids])
    filled = fill_masks(
        run.model, ids_1S, tok.mask_id, tok.num_normal, o.temperature or 0.0, o.top_k or 0, o.seed or 0,
        run.gate,
    )  # fmt: skip
    return Generated(tok.decode(filled[0].tolist()), ids, filled[ids_1S == tok.mask_id].tolist())


# model kind -> (what generation means for it, the options it reads, how to say so)
KINDS: dict[str, tuple[Callable[[Any, str, Options], Generated], set[str], str]] = {
    "decoder": (
        continue_prompt,
        {"max_new_tokens", "temperature", "top_k", "seed"},
        "a language model's run continues the prompt by sampling (--max-new-tokens, --temperature, "
        "--top-k, --seed)",
    ),
    "encdec": (
        translate_prompt,
        {"max_new_tokens", "beam", "length_penalty"},
        "a translation run decodes with greedy or beam search (--beam, --length-penalty, --max-new-tokens)",
    ),
    "encoder": (
        fill_prompt,
        {"temperature", "top_k", "seed"},
        f"a masked-LM run fills each {MASK} of the prompt (--temperature, default 0: the argmax; "
        "--top-k, --seed)",
    ),
}


def run_prompt(run: Any, prompt: str, opts: Options) -> Generated:
    """What ``evomoe generate`` prints for ``run`` (a ``train.load_run.LoadedRun``); ValueError for an option
    the run's kind does not read, or a prompt it cannot take."""
    kind = getattr(run.model, "kind", "")
    if kind not in KINDS:
        raise ValueError(f"a '{kind}' model has no generation (models that have: {', '.join(KINDS)})")
    fn, reads, how = KINDS[kind]
    for f in dataclasses.fields(opts):
        if getattr(opts, f.name) is not None and f.name not in reads:
            raise ValueError(f"{flag(f.name)}: {how}")
    return fn(run, prompt, opts)
