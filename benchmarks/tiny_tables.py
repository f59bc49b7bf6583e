"""The tiny-budget tables of docs/results.md (sections 4 and 5) and the README's numbers taken from them,
written from ``evomoe compare`` runs and checked against the docs.

    python benchmarks/tiny_tables.py            # run (or reuse) both comparisons; exit 1 if a doc is stale
    python benchmarks/tiny_tables.py --write    # the same, then rewrite the tables and the README numbers
    python benchmarks/tiny_tables.py --tables tiny-mlm --methods switch   # one row (the fast test's)

Each table is ``evomoe compare PRESET --methods ... --out OUT/cmp_*`` with the preset as shipped (one seed,
one thread: the presets set ``train.threads = 1``; the runs are deterministic, so a row is the same on every
run of the same code). ``compare`` reuses finished runs in ``--out``, so a second call only re-tabulates.
A row is compared cell by cell with the one between the table's markers in docs/results.md (bold ignored);
the steps and FLOPs to the target (Switch's final loss) are compared only when Switch is among the runs.
``make tiny-tables`` runs the whole check (~12 min on a 2-core CPU); ``tests/test_doc_tables.py`` runs one
row.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
try:
    import evomoe  # noqa: F401
except ImportError:  # a checkout without the package installed
    sys.path.insert(0, str(ROOT / "src"))

METHODS = "dts,switch,gshard,base,hash,stablemoe,dense"
# per table: the compare directory, and its own columns: (header, key in compare.json, format, best)
TABLES = {
    "tiny-mlm": (
        "cmp_mlm",
        [
            ("masked-token val loss", "val_loss", ".4f", min),
            ("val ppl", "val_ppl", ".2f", min),
            ("masked accuracy", "masked_accuracy", ".4f", max),
        ],
    ),
    "tiny-mt": (
        "cmp_mt",
        [
            ("val loss", "val_loss", ".4f", min),
            ("val ppl", "val_ppl", ".2f", min),
            ("BLEU (beam)", "bleu", ".1f", max),
            ("chrF (beam)", "chrf", ".1f", max),
            ("BLEU (greedy)", "bleu_greedy", ".1f", max),
        ],
    ),
}
TAIL = ["train FLOPs", "experts/token", "dropped", "steps to target", "FLOPs to target"]
TARGET_CELLS = 2  # the last two columns depend on the target method's runs
# the README's sentence: "BLEU (beam): dts 21.4, switch 35.0, ..." and "masked-token loss: dts 3.206, ..."
README_LISTS = {
    "tiny-mt": (r"BLEU \(beam\): ", "bleu", ".1f"),
    "tiny-mlm": (r"masked-token loss: ", "val_loss", ".3f"),
}


def begin_marker(name: str) -> str:
    return f"<!-- {name} table: written by benchmarks/tiny_tables.py --write; do not edit by hand -->"


def end_marker(name: str) -> str:
    return f"<!-- end of the {name} table -->"


def run_compare(name: str, methods: str, out: Path) -> dict:
    from evomoe.cli import main  # noqa: PLC0415

    target = out / TABLES[name][0]
    if main(["compare", name, "--methods", methods, "--out", str(target)]) != 0:
        raise SystemExit(f"evomoe compare {name} failed")
    return json.loads((target / "compare.json").read_text())


def value(r: dict, key: str) -> tuple[float, float]:
    if key in ("val_loss", "val_ppl"):
        return r[key], r[f"{key}_std"]
    mean, std = r["metrics"][key]
    return mean, std


def cells(summary: dict, name: str) -> dict[str, list[str]]:
    """Per method, the table's cells after the method name (no bold)."""
    out = {}
    for method, r in summary["methods"].items():
        row = [str(len(r["seeds"]))]
        for _, key, spec, _ in TABLES[name][1]:
            mean, std = value(r, key)
            row.append(format(mean, spec) + (f" ± {format(std, spec)}" if len(r["seeds"]) > 1 else ""))
        steps, flops = r["steps_to_target"], r["flops_to_target"]
        row += [
            format(r["train_flops"], ".3g"),
            format(r["experts_per_token"], ".2f"),
            format(r["dropped_fraction"], ".3f"),
            "not reached" if steps is None else format(steps, ".0f"),
            "not reached" if flops is None else format(flops, ".3g"),
        ]
        out[method] = row
    return out


def table(summary: dict, name: str) -> list[str]:
    """The markdown table, the best value of each own column in bold."""
    cols = TABLES[name][1]
    rows = cells(summary, name)
    best = {}
    for i, (_, key, _, pick) in enumerate(cols):
        best[i] = pick(value(r, key)[0] for r in summary["methods"].values())
    head = ["method", "seeds", *[c[0] for c in cols], *TAIL]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method, row in rows.items():
        r = summary["methods"][method]
        shown = list(row)
        for i, (_, key, _, _) in enumerate(cols):
            if len(summary["methods"]) > 1 and value(r, key)[0] == best[i]:
                shown[1 + i] = f"**{shown[1 + i]}**"
        lines.append(f"| {method} | " + " | ".join(shown) + " |")
    if name == "tiny-mt":
        lines += ["", beam_note(summary)]
    return lines


def beam_note(summary: dict) -> str:
    worse = [
        f"{m} ({r['metrics']['bleu'][0]:.1f} vs {r['metrics']['bleu_greedy'][0]:.1f})"
        for m, r in summary["methods"].items()
        if r["metrics"]["bleu"][0] <= r["metrics"]["bleu_greedy"][0]
    ]
    if not worse:
        return "Beam search scores above greedy (BLEU) for every method."
    listed = worse[0] if len(worse) == 1 else ", ".join(worse[:-1]) + " and " + worse[-1]
    return f"Beam search scores above greedy (BLEU) for every method but {listed}."


def doc_block(text: str, name: str) -> tuple[int, int]:
    lines = text.split("\n")
    try:
        return lines.index(begin_marker(name)), lines.index(end_marker(name))
    except ValueError:
        raise SystemExit(f"docs/results.md: the markers of the {name} table are missing") from None


def doc_cells(text: str, name: str) -> tuple[dict[str, list[str]], list[str]]:
    lo, hi = doc_block(text, name)
    block = text.split("\n")[lo + 1 : hi]
    rows = {}
    for line in block[2:]:
        if not line.startswith("| "):
            continue
        parts = [c.strip().replace("**", "") for c in line.strip().strip("|").split("|")]
        rows[parts[0]] = parts[1:]
    notes = [line for line in block if line and not line.startswith("|")]
    return rows, notes


def check(name: str, summary: dict, doc: str, readme: str, complete: bool) -> list[str]:
    """Differences between the runs and the docs, as messages (empty: the docs are true)."""
    got, problems = cells(summary, name), []
    want, notes = doc_cells(doc, name)
    with_target = summary["target_method"] in summary["methods"]
    for method, row in got.items():
        if method not in want:
            problems.append(f"{name}: no row for {method} in docs/results.md")
            continue
        n = len(row) if with_target else len(row) - TARGET_CELLS
        for i in range(n):
            if i >= len(want[method]) or want[method][i] != row[i]:
                head = ["seeds", *[c[0] for c in TABLES[name][1]], *TAIL][i]
                doc_value = want[method][i] if i < len(want[method]) else "-"
                problems.append(f"{name} {method} {head}: docs {doc_value}, runs {row[i]}")
    if complete:
        problems += [f"{name}: docs/results.md has a row for {m}, not run" for m in want if m not in got]
        if name == "tiny-mt" and beam_note(summary) not in notes:
            problems.append(f"{name}: the beam/greedy note should read: {beam_note(summary)}")
    lead, key, spec = README_LISTS[name]
    found = re.search(lead + r"((?:[a-z_]+ \d+(?:\.\d+)?(?:, )?)+)", readme)
    if found is None:
        problems.append(f"README.md: the list after '{lead}' is missing")
        return problems
    for method, shown in re.findall(r"([a-z_]+) (\d+(?:\.\d+)?)", found.group(1)):
        if method in summary["methods"]:
            runs = format(value(summary["methods"][method], key)[0], spec)
            if runs != shown:
                problems.append(f"README.md {name} {method}: {shown}, runs {runs}")
    return problems


def write(name: str, summary: dict, doc: str, readme: str) -> tuple[str, str]:
    lo, hi = doc_block(doc, name)
    lines = doc.split("\n")
    doc = "\n".join([*lines[: lo + 1], *table(summary, name), *lines[hi:]])
    lead, key, spec = README_LISTS[name]

    def fill(m: re.Match) -> str:
        items = re.findall(r"([a-z_]+) (\d+(?:\.\d+)?)", m.group(2))
        new = [f"{k} {format(value(summary['methods'][k], key)[0], spec)}" for k, _ in items]
        return m.group(1) + ", ".join(new)

    pattern = "(" + lead + r")((?:[a-z_]+ \d+(?:\.\d+)?(?:, )?)+[a-z_]+ \d+(?:\.\d+)?)"
    readme = re.sub(pattern, fill, readme, count=1)
    return doc, readme


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/tiny_tables", help="the compare runs (finished ones reused)")
    p.add_argument("--tables", default="tiny-mlm,tiny-mt")
    p.add_argument("--methods", default=METHODS, help="a subset checks only those rows")
    p.add_argument("--write", action="store_true", help="rewrite the tables and README numbers from the runs")
    p.add_argument(
        "--docs", default=str(ROOT), help="the checkout whose docs/results.md and README.md to use"
    )
    args = p.parse_args(argv)
    complete = set(args.methods.split(",")) == set(METHODS.split(","))
    if args.write and not complete:
        raise SystemExit("--write needs every method (a table is written whole)")
    results, readme_path = Path(args.docs) / "docs" / "results.md", Path(args.docs) / "README.md"
    doc, readme = results.read_text(encoding="utf-8"), readme_path.read_text(encoding="utf-8")
    problems = []
    for name in args.tables.split(","):
        if name not in TABLES:
            raise SystemExit(f"--tables: unknown table '{name}' (choose from {', '.join(TABLES)})")
        summary = run_compare(name, args.methods, Path(args.out))
        print("\n".join(table(summary, name)))
        if args.write:
            doc, readme = write(name, summary, doc, readme)
        else:
            problems += check(name, summary, doc, readme, complete)
    if args.write:
        results.write_text(doc, encoding="utf-8")
        readme_path.write_text(readme, encoding="utf-8")
        print(f"wrote {results} and {readme_path}")
        return 0
    for line in problems:
        print("STALE:", line)
    print(
        "the documented tiny-budget rows match the runs"
        if not problems
        else f"{len(problems)} stale value(s)"
    )
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
