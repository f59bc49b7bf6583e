"""A generated, learnable translation task that needs no download (the ``tiny-mt`` preset).

Two made-up languages of pseudo-words built from syllables. A source sentence is a random sequence of
source words; its translation maps every word through a fixed bilingual dictionary and reverses the
order (so the model must learn both a lexicon and a reordering: attention, not just copying). Everything
is a pure function of the generator seed.
"""

from __future__ import annotations

import numpy as np

from .parallel import ParallelText

_CONSONANTS = "bdfgklmnprstvz"
_VOWELS = "aeiou"


def make_words(rng: np.random.Generator, n: int, syllables: tuple[int, int], taken: set[str]) -> list[str]:
    """``n`` distinct pseudo-words of 1..3 consonant-vowel syllables, none of them in ``taken``."""
    words: list[str] = []
    while len(words) < n:
        k = int(rng.integers(syllables[0], syllables[1] + 1))
        w = "".join(_CONSONANTS[rng.integers(len(_CONSONANTS))] + _VOWELS[rng.integers(5)] for _ in range(k))
        if w not in taken:
            taken.add(w)
            words.append(w)
    return words


def translate(sentence: list[str], lexicon: dict[str, str]) -> list[str]:
    """The transduction: map every word, reverse the order."""
    return [lexicon[w] for w in reversed(sentence)]


def generate_pairs(
    n_pairs: int, n_words: int = 32, min_len: int = 2, max_len: int = 8, seed: int = 0
) -> ParallelText:
    """``n_pairs`` (source, target) sentences of ``min_len..max_len`` words over ``n_words``-word lexicons."""
    rng = np.random.default_rng([seed, 0x5E17])
    taken: set[str] = set()
    src_words = make_words(rng, n_words, (1, 2), taken)
    tgt_words = make_words(rng, n_words, (2, 3), taken)
    lexicon = dict(zip(src_words, tgt_words, strict=True))
    source, target = [], []
    for _ in range(n_pairs):
        length = int(rng.integers(min_len, max_len + 1))
        sent = [src_words[i] for i in rng.integers(0, n_words, size=length)]
        source.append(" ".join(sent))
        target.append(" ".join(translate(sent, lexicon)))
    origin = f"generated transduction ({n_words} words, {min_len}-{max_len} per sentence, seed {seed})"
    return ParallelText(source, target, n_read=n_pairs, origin=origin)
