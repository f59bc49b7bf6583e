"""Bad input through the command line: each case exits with status 2 and one ``error:`` line that names
the field or file and the fix, before any work starts, and leaves the files already there intact.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
from pathlib import Path

import pytest

from evomoe.config import Config, ConfigError, load_config
from evomoe.data import load_token_data
from evomoe.registry import ROUTERS

SHORT = [
    "tiny",
    "--no-progress",
    "--train.steps=4",
    "--evolve.diversify_steps=2",
    "--gate.decay_steps=2",
    "--gate.hard_after=1",
    "--train.threads=1",
    "--train.eval_batches=1",
]


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    return lines[0]


# ----------------------------------------------------------------------------------------------------
# config values: rejected before anything is created


BAD_VALUES = [
    ("--train.lr=-1", "train.lr = -1.0: must be > 0"),
    ("--train.lr=nan", "train.lr = nan: must be > 0"),
    ("--model.d_model=65", "model.d_model = 65: must be divisible by n_heads=2"),
    ("--router.name=nope", f"router.name = 'nope': choose from: {', '.join(ROUTERS.names())}"),
    ("--train.steps=abc", "train.steps: expected int, got 'abc' (str)"),
    ("--train.bogus=1", "unknown config key 'train.bogus'"),
    ("--evolve.diversify_steps=100", "evolve.diversify_steps = 100: must be < train.steps=4"),
    ("--gate.tau_min=3", "gate.tau_min = 3.0: must be in (0, tau_max=2.0]"),
    ("--gate.decay_steps=0", "gate.decay_steps = 0: must be >= 1"),
    ("--data.tokenizer=words", "data.tokenizer = 'words': choose from: bpe, bytes"),
    ("--train.precision=fp16", "train.precision = 'fp16': choose from: fp32, bf16"),
    ("--parallel.ep=3", "parallel.ep = 3: must divide moe.num_experts=4"),
    ("--router.topk.k=5", "router.topk.k = 5: must be in [1, num_experts=4]"),
    ("--train.max_skipped_steps=0", "train.max_skipped_steps = 0: must be >= 1"),
    ("--train.steps", "override '--train.steps' has no value"),
]


@pytest.mark.parametrize("override,message", BAD_VALUES, ids=[b[0] for b in BAD_VALUES])
def test_bad_config_value_is_rejected_before_work_starts(cli, tmp_path, override, message):
    out = tmp_path / "run"
    rc, stdout, err = cli("train", *SHORT, override, "--out", out)
    assert rc == 2
    assert message in error_line(err)
    assert not out.exists()  # nothing created: validation runs before any work


def scalar_fields(obj, prefix=""):
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            yield from scalar_fields(value, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", type(value)


WRONG_TYPE = {int: '"x"', float: '"x"', bool: "3", str: "5"}


def test_every_config_field_checks_its_type():
    fields = list(scalar_fields(Config()))
    assert len(fields) > 60
    for path, typ in fields:
        if path == "schema":  # the version of the file layout, not a setting
            with pytest.raises(ConfigError, match="schema cannot be overridden"):
                load_config("tiny", ["--schema=1"])
            continue
        with pytest.raises(ConfigError, match="^" + re.escape(f"{path}: expected {typ.__name__}, got")):
            load_config("tiny", [f"--{path}={WRONG_TYPE[typ]}"])


# values that cannot work (negative or non-finite weights, a negative seed): each must name its field
ACCEPTED_BUT_IMPOSSIBLE = [
    ("train.seed", "-1"),  # crashes after the data is loaded: ValueError traceback from train_batch
    ("evolve.noise", "inf"),  # spawned experts are inf: every step is skipped
    ("train.weight_decay", "inf"),
    ("router.dts.balance_weight", "inf"),
    ("router.topk.aux_weight", "inf"),
    ("router.stablemoe.balance_weight", "nan"),
    ("router.stablemoe.distill_weight", "-1.0"),
    ("router.base.auction_eps", "-1.0"),
    ("router.base.auction_eps", "nan"),
]


@pytest.mark.parametrize(
    "field,value", ACCEPTED_BUT_IMPOSSIBLE, ids=[f"{f}={v}" for f, v in ACCEPTED_BUT_IMPOSSIBLE]
)
def test_impossible_values_are_rejected(field, value):
    try:
        load_config("tiny", [f"--{field}={value}"])
    except ConfigError as e:
        assert field in str(e)
    else:
        raise AssertionError(f"--{field}={value} was accepted")


def test_config_file_problems_name_the_file(cli, tmp_path):
    out = tmp_path / "run"
    cases = {
        "missing.toml": (None, "config file '{p}' does not exist"),
        "broken.toml": (b"[train\nsteps = 4\n", "config file '{p}' is not valid TOML"),
        "latin1.toml": (
            '[data]\ncorpus = "caf\xe9"\n'.encode("latin-1"),
            "config file '{p}' is not UTF-8 text",
        ),
        "binary.toml": (bytes(range(256)), "config file '{p}' is not"),
        "unknown.toml": (b"[trian]\nsteps = 4\n", "unknown config key 'trian'"),
    }
    for name, (content, message) in cases.items():
        p = tmp_path / name
        if content is not None:
            p.write_bytes(content)
        rc, stdout, err = cli("train", p, "--out", out)
        assert rc == 2, name
        assert message.format(p=p) in error_line(err), name
    rc, stdout, err = cli("train", "tinyy", "--out", out)
    assert "config 'tinyy' is neither a TOML file nor a preset (choose from: " in error_line(err)
    assert not out.exists()


# ----------------------------------------------------------------------------------------------------
# data


def write_corpus(root: Path, files: dict[str, bytes]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (root / name).write_bytes(data)
    return root


def test_bad_data_names_the_corpus_and_the_fix(cli, tmp_path):
    text = b"".join(b"def f_%d(x):\n    return x + %d\n" % (i, i) for i in range(40))
    empty_dir = tmp_path / "empty_dir"
    empty_dir.mkdir()
    broken = write_corpus(tmp_path / "broken", {"a.py": text * 3})
    (broken / "b.py").symlink_to(tmp_path / "nowhere.py")  # listed, cannot be read
    cases = {
        "missing": (
            tmp_path / "nowhere",
            "the path '{p}' does not exist; set data.corpus to 'stdlib' or to an "
            "existing text file or directory",
        ),
        "empty dir": (empty_dir, "the corpus is empty (no non-empty files with suffixes"),
        "empty file": (
            write_corpus(tmp_path / "ef", {"a.txt": b""}) / "a.txt",
            "the corpus is empty (no text",
        ),
        "binary": (
            write_corpus(tmp_path / "bin", {"a.py": b"\0\1\2" * 100, "b.txt": b"x\0" * 50}),
            "the corpus has no text (2 binary files skipped under '{p}'); point data.corpus at text files",
        ),
        "unreadable": (
            broken,
            "data.corpus: cannot read '{p}/b.py' (No such file or directory); fix its "
            "permissions or remove it from the corpus",
        ),
        "too small": (
            write_corpus(tmp_path / "small", {"a.py": text[:200]}) / "a.py",
            "corpus smaller than one batch",
        ),
    }
    for name, (path, message) in cases.items():
        out = tmp_path / "out" / name.replace(" ", "_")
        rc, stdout, err = cli("train", *SHORT, f"--data.corpus={path}", "--out", out)
        assert rc == 2, (name, err[-2000:])
        line = error_line(err)
        assert "data.corpus" in line and message.format(p=path) in line, (name, line)
        assert not out.exists(), name  # not even an empty directory


def test_bad_translation_data_leaves_nothing(cli, tmp_path):
    """Data errors found while the task loads (after the config validated) create no --out either."""
    (tmp_path / "src.txt").write_text("one\ntwo\nthree\n")
    (tmp_path / "tgt.txt").write_text("uno\ndos\n")
    missing = tmp_path / "nowhere.txt"
    cases = {
        "misaligned": (tmp_path / "src.txt", "are not line-aligned: '{s}' has 3 lines but '{t}' has 2"),
        "missing": (missing, "task.mt.source = '{s}': cannot read it (No such file or directory)"),
    }
    for name, (src, message) in cases.items():
        out = tmp_path / "out" / name
        args = [f"--task.mt.source={src}", f"--task.mt.target={tmp_path / 'tgt.txt'}", "--no-progress"]
        rc, stdout, err = cli("train", "tiny-mt", *args, "--out", out)
        assert rc == 2 and message.format(s=src, t=tmp_path / "tgt.txt") in error_line(err), (name, err)
        assert not out.exists() and not (tmp_path / "out").exists(), name


def test_unreadable_file_by_permissions(cli, tmp_path):
    corpus = write_corpus(tmp_path / "c", {"a.py": b"x = 1\n" * 500, "b.py": b"y = 2\n" * 500})
    os.chmod(corpus / "b.py", 0)
    try:
        if os.access(corpus / "b.py", os.R_OK):
            pytest.skip("running as root: chmod 000 does not stop reads (the broken-symlink case covers it)")
        rc, stdout, err = cli("train", *SHORT, f"--data.corpus={corpus}", "--out", tmp_path / "out")
        assert rc == 2 and f"cannot read '{corpus / 'b.py'}' (Permission denied)" in error_line(err)
    finally:
        os.chmod(corpus / "b.py", 0o644)


NON_UTF8 = "r\xe9sum\xe9 na\xefve caf\xe9 \xa9 \xb5\n".encode("latin-1")


def non_utf8_corpus(tmp_path: Path) -> Path:
    lines = b"".join(b"def f_%d(x):\n    return x * %d\n" % (i, i) for i in range(400))
    files = {f"good_{i}.py": lines for i in range(6)}
    files["latin1.txt"] = NON_UTF8 * 40
    return write_corpus(tmp_path / "mixed", files)


def test_non_utf8_bytes_are_replaced_and_counted(tmp_path):
    """Non-UTF-8 text is not an error: each bad byte becomes U+FFFD, and the load says how many."""
    logs: list[str] = []
    cfg = load_config(
        "tiny", [f"--data.corpus={non_utf8_corpus(tmp_path)}", f"--data.cache_dir={tmp_path / 'c'}"]
    )
    data = load_token_data(cfg.data, cfg.model.seq_len, cfg.train.batch_size, env={}, log=logs.append)
    assert data.meta["n_replaced"] == 6 * 40
    assert any(f"{6 * 40} undecodable bytes replaced" in line for line in logs), logs


def test_non_utf8_warning_names_the_file(tmp_path):
    logs: list[str] = []
    cfg = load_config(
        "tiny", [f"--data.corpus={non_utf8_corpus(tmp_path)}", f"--data.cache_dir={tmp_path / 'c'}"]
    )
    load_token_data(cfg.data, cfg.model.seq_len, cfg.train.batch_size, env={}, log=logs.append)
    assert any("latin1.txt" in line and "UTF-8" in line for line in logs), logs


# ----------------------------------------------------------------------------------------------------
# the output directory


def test_out_dir_with_another_run_is_not_overwritten(cli, copy_run, tiny_args):
    run = copy_run()
    before = snapshot(run)
    rc, stdout, err = cli("train", *tiny_args, "--out", run)
    line = error_line(err)
    assert (
        rc == 2
        and f"--out '{run}' already holds a run (config.toml, metrics.jsonl, eval.jsonl, checkpoints" in line
    )
    assert "pass --resume to continue it, --overwrite to replace it, or choose another directory" in line
    assert snapshot(run) == before


def test_overwrite_replaces_the_run_when_asked(cli, copy_run):
    run = copy_run()
    rc, stdout, err = cli("train", *SHORT, "--out", run, "--overwrite")
    assert rc == 0, err
    assert sorted(p.name for p in (run / "checkpoints").glob("step_*")) == ["step_00000004"]
    assert load_config(str(run / "config.toml")).train.steps == 4


def test_out_dir_that_cannot_be_written(cli, tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("keep me")
    rc, stdout, err = cli("train", *SHORT, "--out", a_file)
    assert rc == 2 and f"--out '{a_file}' exists and is not a directory" in error_line(err)
    rc, stdout, err = cli("train", *SHORT, "--out", a_file / "run")
    assert rc == 2 and f"--out '{a_file / 'run'}' is not writable: Not a directory" in error_line(err)
    assert a_file.read_text() == "keep me"


def test_read_only_out_dir(cli, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    os.chmod(ro, 0o555)
    try:
        if os.access(ro, os.W_OK):
            pytest.skip(
                "running as root: chmod 555 does not stop writes (test_out_dir_that_cannot_be_written "
                "covers an unwritable --out)"
            )
        rc, stdout, err = cli("train", *SHORT, "--out", ro / "run")
        assert rc == 2 and "is not writable: Permission denied" in error_line(err)
    finally:
        os.chmod(ro, 0o755)


# ----------------------------------------------------------------------------------------------------
# resuming with another config, or from a damaged run directory


def test_resume_with_an_incompatible_config(cli, copy_run, tiny_args):
    run = copy_run()
    before = snapshot(run)
    rc, stdout, err = cli("train", *tiny_args, "--model.d_model=32", "--out", run, "--resume")
    line = error_line(err)
    assert rc == 2 and "model.d_model = 32 differs from the run being resumed (64); only " in line
    assert "may change on --resume (or start a new --out)" in line
    assert snapshot(run) == before


def test_checkpoint_from_an_incompatible_config(cli, copy_run, tiny_args):
    """config.toml gone (or from elsewhere): the checkpoint itself does not fit the model."""
    run = copy_run()
    (run / "config.toml").unlink()
    before = snapshot(run)
    rc, stdout, err = cli("train", *tiny_args, "--model.d_ff=96", "--out", run, "--resume")
    line = error_line(err)
    assert (
        rc == 2
        and f"checkpoint '{run / 'checkpoints' / 'step_00000040'}' does not match this run's config" in line
    )
    assert snapshot(run) == before


def test_torn_config_toml_is_reported(cli, copy_run, tiny_args):
    run = copy_run()
    text = (run / "config.toml").read_text()
    (run / "config.toml").write_text(text[: len(text) // 2] + "[mod")
    before = snapshot(run)
    rc, stdout, err = cli("train", *tiny_args, "--out", run, "--resume")
    assert rc == 2 and f"config file '{run / 'config.toml'}' is not valid TOML" in error_line(err)
    assert snapshot(run) == before


def test_eval_rejects_overrides_that_change_the_model(cli, tiny_run):
    rc, stdout, err = cli("eval", tiny_run, "--model.d_model=32")
    assert (
        rc == 2
        and "eval accepts only task.mt.eval_sentences, train.batch_size, train.device, train.eval_batches, "
        "train.threads"
        in (error_line(err))
    )
    rc, stdout, err = cli("eval", tiny_run / "nothing_here")
    assert (
        rc == 2
        and f"checkpoint '{tiny_run / 'nothing_here'}' is incomplete (no manifest.json)" in error_line(err)
    )


def test_copy_of_a_run_is_independent(copy_run, tiny_run):
    run = copy_run()
    shutil.rmtree(run / "checkpoints")
    assert (tiny_run / "checkpoints").is_dir()
