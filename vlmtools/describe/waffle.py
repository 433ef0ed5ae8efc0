"""WaffleCLIP's control (Roth et al., ICCV 2023): descriptors that are random words and random characters.

If these score as well as LLM descriptors, the descriptors' content is not what helps. Following the
WaffleCLIP 'waffle' mode: ``count`` pairs of (random-word, random-character) descriptors, shaped like the
class names (words per name, word length, character groups), and one shared set for every class.
Characters come from a-z0-9, or, as theirs, from the characters of a descriptor file's words
(``characters_of``: split on spaces, ',' and '.' removed). Differences: names are measured after
'_' -> ' '; words come from a packaged list (theirs is a pickled English word list). WaffleCLIP reports the
mean over several draws (--reps, seeds 0..reps-1): ``draws`` writes one file per seed for that.
"""

from __future__ import annotations

import math
import random
import string
from pathlib import Path
from statistics import mean

from vlmtools.describe.styles import TEMPLATE_DIR
from vlmtools.errors import BadInput
from vlmtools.formats import read_text
from vlmtools.prompts import wordify

CHARACTERS = string.ascii_lowercase + string.digits
DEFAULT_COUNT = 15  # pairs, as WaffleCLIP's --waffle_count


def read_words(path: str | Path | None = None) -> list[str]:
    p = Path(path) if path else TEMPLATE_DIR / "waffle_words.txt"
    if not p.is_file():
        raise BadInput(f"--waffle-words {p}: no such file")
    words = [w.strip() for w in read_text(p).split("\n")]
    words = [w for w in words if w and not w.startswith("#")]
    if not words:
        raise BadInput(f"{p}: no words")
    return words


def characters_of(records: list[dict]) -> str:
    """WaffleCLIP's character set: the distinct characters of the descriptors' words, without ',' and '.'
    (and without spaces), sorted."""
    words = {w.replace(",", "").replace(".", "") for r in records for d in r["descriptors"] for w in d.split(" ")}
    chars = "".join(sorted(set("".join(words))))
    if not chars:
        raise BadInput("--waffle-chars: the descriptors have no characters to draw from")
    return chars


def waffle_descriptors(classes: list[str], count: int = DEFAULT_COUNT, seed: int = 0,
                       words: list[str] | None = None, characters: str = CHARACTERS) -> list[str]:
    """2 * ``count`` descriptors shared by all classes, reproducible from ``seed``."""
    if count < 1:
        raise BadInput(f"--waffle-count {count}: must be at least 1")
    names = [wordify(c).split() or [c] for c in classes]
    rng = random.Random(seed)
    words_per_name = max(round(mean(len(n) for n in names)), 1)
    word_length = max(round(mean(mean(len(w) for w in n) for n in names)), 1)
    pool = sorted({w[:word_length] for w in (words or read_words())})
    groups = round(mean(len(n) - 1 for n in names)) + 1
    chars = math.ceil(mean(max(len(w) for w in n) for n in names))
    chars += groups - chars % groups  # as theirs: round up to a multiple of the group count (always adds)
    per_group = chars // groups
    out = []
    for _ in range(count):
        out.append(" ".join(rng.choice(pool) for _ in range(words_per_name)))
        out.append(", ".join("".join(rng.choice(characters) for _ in range(per_group)) for _ in range(groups)))
    return out
