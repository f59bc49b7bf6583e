"""Write an export plan as a Hugging Face directory, all or nothing.

transformers builds the model from the plan's config, the weights are loaded strictly and written with its
own ``save_pretrained`` (so the files are in the layout its loader expects), next to the tokenizer files.
Everything is written into a temporary directory beside the target, which then takes the target's place:
a failed export leaves the target as it was, and a replaced directory keeps no file of the old one (a
stale ``model.safetensors.index.json`` would otherwise be loaded instead of the new weights). A directory
that is not empty is replaced only when asked (``overwrite``).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path

import torch

from .plan import ExportError, ExportPlan, max_positions


def check_target(out: Path, overwrite: bool, keep: Path | None = None) -> None:
    """ExportError unless ``out`` is absent, an empty directory, or (``overwrite``) a directory that neither
    holds nor lies inside ``keep`` (the checkpoint being exported)."""
    if keep is not None:
        out_, keep_ = out.resolve(), keep.resolve()
        if out_ in (keep_, *keep_.parents) or keep_ in out_.parents:
            raise ExportError(
                f"--out '{out}' holds the run being exported ({keep}): choose another directory"
            )
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out '{out}' exists and is not a directory")
    entries = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if entries and not overwrite:
        shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
        raise ExportError(
            f"--out '{out}' is not empty ({len(entries)} {'entry' if len(entries) == 1 else 'entries'}: "
            f"{shown}): pass --overwrite to replace it "
            "(all of it, at once), or choose another directory"
        )


def tokenizer_files(plan: ExportPlan, tokenizer_json: str) -> dict[str, str]:
    """``tokenizer.json`` (with ``<s>`` put before every text where the model reads it so) and the
    ``tokenizer_config.json`` that names the special tokens transformers' tokenizer should use."""
    from tokenizers import Tokenizer, processors  # noqa: PLC0415

    tok = Tokenizer.from_str(tokenizer_json)
    names = {role: tok.id_to_token(i) for role, i in plan.special_tokens.items()}
    names = {role: name for role, name in names.items() if name is not None}
    if plan.bos_prefix and "bos_token" in names:
        bos = (names["bos_token"], plan.special_tokens["bos_token"])
        tok.post_processor = processors.TemplateProcessing(single=f"{bos[0]} $A", special_tokens=[bos])
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": max_positions(plan), **names}
    return {"tokenizer.json": tok.to_str(), "tokenizer_config.json": json.dumps(config, indent=1) + "\n"}


def build(plan: ExportPlan):
    """The transformers model of the plan, holding its weights (strict: every tensor placed)."""
    import transformers  # noqa: PLC0415 - only export needs it

    config = transformers.AutoConfig.for_model(plan.model_type, **plan.config)
    model = getattr(transformers, plan.auto_class).from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(plan.state_dict, strict=False)
    tied = (getattr(model, "_tied_weights_keys", None) or {}) if config.tie_word_embeddings else {}
    missing = [m for m in missing if m not in tied]
    if missing or unexpected:  # pragma: no cover - the adapters and transformers disagree
        raise ExportError(f"{plan.model_type}: missing {missing[:5]}, unexpected {unexpected[:5]} weights")
    if config.tie_word_embeddings:
        model.tie_weights()
    if plan.generation and model.can_generate():
        for key, value in plan.generation.items():
            setattr(model.generation_config, key, value)
    return model


def write_export(
    plan: ExportPlan, out: str | Path, tokenizer_json: str | None = None, overwrite: bool = False
) -> Path:
    """Write the plan into ``out`` (see the module's docstring); returns ``out``."""
    out = Path(out)
    check_target(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        build(plan).save_pretrained(tmp)
        if tokenizer_json is not None:
            for name, text in tokenizer_files(plan, tokenizer_json).items():
                (tmp / name).write_text(text, encoding="utf-8")
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def replace_dir(new: Path, target: Path) -> None:
    """``new`` takes ``target``'s place; the old directory is moved aside first and removed after, so the
    target is at every moment either the old or the new directory (absent only between two renames)."""
    if not target.exists():
        os.rename(new, target)
        return
    old = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.old")
    os.rename(target, old)
    try:
        os.rename(new, target)
    except BaseException:
        os.rename(old, target)
        raise
    shutil.rmtree(old)
