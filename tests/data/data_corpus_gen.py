"""Generated, seeded Python-like text for the data tests (imported by conftest and test modules)."""

from __future__ import annotations

import random

WORDS = (
    "def class return self import from value items index count total result data list dict "
    "None True False for while if else elif in not and or with as yield lambda try except"
).split()


def code_text(rng: random.Random, n_lines: int) -> str:
    """Python-looking text: indented lines of words, operators and numbers."""
    lines = []
    for _ in range(n_lines):
        indent = "    " * rng.randrange(3)
        words = [rng.choice(WORDS) for _ in range(rng.randrange(2, 8))]
        op = rng.choice([" = ", "(", ".", ", ", " + ", ": "])
        lines.append(f"{indent}{' '.join(words[:2])}{op}{' '.join(words[2:])} {rng.randrange(1000)}")
    return "\n".join(lines) + "\n"
