"""The offline world: attribute vocabulary, made-up classes, captions, oracle descriptors, a batch sampler.

A class ("species") is a distribution over attributes: {attribute: [[value, probability], ...]}.
Captions and descriptors are built from the same attribute phrases, so that what the micro CLIP learned
from captions is what an oracle descriptor says. Class names never appear in captions.
"""

from __future__ import annotations

import numpy as np

from vlmtools.formats import WORLD_FORMAT
from vlmtools.prompts import cbd_clause
from vlmtools.synth.render import (COLOURS, DOMAINS, HABITATS, PAINT_STYLES, PATTERNS, SHAPES, SIZES,
                                   random_nuisance, render)

WORLD_VERSION = WORLD_FORMAT
OBJECT_ATTRIBUTES = ("colour", "shape", "pattern", "size")
VOCAB = {
    "colour": tuple(COLOURS),
    "shape": SHAPES,
    "pattern": PATTERNS,
    "size": SIZES,
    "habitat": HABITATS,
    "domain": DOMAINS,
}

# ----------------------------------------------------------------------------- phrases

PATTERN_ADJ = {"solid": "plain", "striped": "striped", "dotted": "dotted"}
SHAPE_ADJ = {"circle": "round", "square": "square", "triangle": "triangular", "star": "star-shaped",
             "cross": "cross-shaped", "crescent": "crescent-shaped"}
DOMAIN_LEAD = {"photo": "a photo of", "painting": "a painting of"}
STYLE_LEAD = {"posterized": "a posterized painting of", "brush": "a brush painting of",
              "ink": "an ink drawing of"}


def _or(values: list[str]) -> str:
    return " or ".join(values)


def descriptor_phrase(attribute: str, values: list[str]) -> str:
    """One oracle descriptor for an attribute with one or more likely values (CBD style: a noun phrase
    that cbd_clause() turns into "which has ..." / "which is ...")."""
    if attribute == "colour":
        return f"{_or(values)} colouring"
    if attribute == "shape":
        return f"the shape of a {_or(values)}"
    if attribute == "pattern":
        words = {"solid": "a plain solid colour", "striped": "stripes", "dotted": "dots"}
        return _or([words[v] for v in values])
    if attribute == "size":
        return f"a {_or(values)} body"
    if attribute == "habitat":
        return f"{_or(values)} in the background"
    raise ValueError(attribute)


# ----------------------------------------------------------------------------- made-up names

_NAME_ONSETS = ("v", "br", "k", "t", "m", "s", "dr", "l", "z", "qu", "f", "n", "th", "pl", "g", "h")
_NAME_VOWELS = ("a", "e", "i", "o", "u", "ae", "io")
_NAME_ENDINGS = ("rine", "lix", "mar", "ndel", "ssa", "vorn", "thic", "lune", "nok", "ria", "pel", "zar")
_NAME_NOUNS = ("Skipper", "Glider", "Hopper", "Drifter", "Nibbler", "Tumbler", "Flitter", "Spinner",
               "Prowler", "Roamer", "Whistler", "Dabbler", "Twitcher", "Scuttler")
# Filler subjects for CBD-style training captions come from another inventory, so they never coincide
# with a class name; they teach the text tower that a name in front of ", which has ..." carries nothing.
_FILLER_ONSETS = ("w", "gr", "p", "c", "j", "sn", "bl", "r", "y", "st")
_FILLER_ENDINGS = ("bbet", "mmox", "ndy", "sket", "rroo", "ffin", "wump", "lkit")
_FILLER_NOUNS = ("creature", "thing", "critter", "specimen", "beast", "one")

_ATTRIBUTE_WORDS = tuple(w for vals in VOCAB.values() for w in vals) + tuple(SHAPE_ADJ.values()) + (
    "plain", "paint", "photo", "stripe", "dot")


def made_up_name(rng: np.random.Generator) -> str:
    while True:
        word = (rng.choice(_NAME_ONSETS) + rng.choice(_NAME_VOWELS) + rng.choice(_NAME_ONSETS[:8])
                + rng.choice(_NAME_VOWELS) + rng.choice(_NAME_ENDINGS))
        name = f"{word.capitalize()} {rng.choice(_NAME_NOUNS)}"
        if not any(w in name.lower() for w in _ATTRIBUTE_WORDS):
            return name


def filler_subject(rng: np.random.Generator) -> str:
    if rng.random() < 0.3:
        return f"a {rng.choice(_FILLER_NOUNS)}"
    word = rng.choice(_FILLER_ONSETS) + rng.choice(_NAME_VOWELS) + rng.choice(_FILLER_ENDINGS)
    return word.capitalize() if rng.random() < 0.5 else f"{word.capitalize()} {rng.choice(_FILLER_NOUNS)}"


# ----------------------------------------------------------------------------- classes

def _pick(rng, values, k=1, exclude=()):
    pool = [v for v in values if v not in exclude]
    return [str(v) for v in rng.choice(pool, size=k, replace=False)]


def _random_definition(rng: np.random.Generator) -> dict:
    """A class: one main value per attribute, sometimes a second, less likely, colour or habitat."""
    colours = _pick(rng, VOCAB["colour"], 2 if rng.random() < 0.35 else 1)
    habitats = _pick(rng, HABITATS, 2 if rng.random() < 0.3 else 1)
    return {
        "colour": [[colours[0], 0.85], [colours[1], 0.15]] if len(colours) == 2 else [[colours[0], 1.0]],
        "shape": [[_pick(rng, SHAPES)[0], 1.0]],
        "pattern": [[_pick(rng, PATTERNS)[0], 1.0]],
        "size": _size_dist(_pick(rng, SIZES)[0]),
        "habitat": [[habitats[0], 0.8], [habitats[1], 0.2]] if len(habitats) == 2 else [[habitats[0], 1.0]],
    }


def _size_dist(main: str) -> list:
    other = "large" if main == "small" else "small"
    return [[main, 0.9], [other, 0.1]]


def _sibling(rng: np.random.Generator, base: dict, attribute: str, exclude: tuple = ()) -> dict:
    """A fine-grained sibling (one object attribute changed) or a habitat sibling (same object, other place)."""
    sib = {k: [list(p) for p in v] for k, v in base.items()}
    used = [p[0] for p in base[attribute]] + list(exclude)
    if attribute == "size":
        sib["size"] = _size_dist("large" if base["size"][0][0] == "small" else "small")
    else:
        new = _pick(rng, VOCAB[attribute], 1, exclude=used)[0]
        sib[attribute] = [[new, 1.0]]
    return sib


def _signature(defn: dict) -> tuple:
    return tuple(defn[a][0][0] for a in ("colour", "shape", "pattern", "size", "habitat"))


FINE_ATTRIBUTES = ("colour", "pattern", "shape", "colour", "pattern", "size")
NAME_STYLES = ("made-up", "informative")
# informative names: which attribute a name carries (CUB's names mostly name a colour: "Red-winged
# Blackbird", "Yellow Warbler"; some a pattern, a shape or a place: "Spotted Towhee", "Marsh Wren")
NAME_ATTRIBUTE_WEIGHTS = {"colour": 0.5, "pattern": 0.2, "shape": 0.15, "habitat": 0.15}
NAME_WORDS = {"pattern": {"solid": "Plain", "striped": "Striped", "dotted": "Dotted"}}
NAME_TWO_WORDS = 0.5  # share of informative names with two attribute words ("Black-throated Blue Warbler")


def _family(rng: np.random.Generator, base: dict, attribute: str, size: int) -> list[dict]:
    """``size`` classes that differ from ``base`` (the first) in ``attribute`` only, each with its own value."""
    members = [base]
    for _ in range(size - 1):
        taken = tuple(m[attribute][0][0] for m in members)
        members.append(_sibling(rng, base, attribute, exclude=taken if size > 2 else ()))
    return members


def _blend(members: list[dict], attribute: str, overlap: float) -> None:
    """Confusable siblings: each keeps its own value of ``attribute`` with probability 1 - overlap and
    takes one of its siblings' values otherwise, so no image tells the classes apart for sure."""
    values = [m[attribute][0][0] for m in members]
    for m, own in zip(members, values):
        others = [v for v in values if v != own]
        m[attribute] = [[own, round(1 - overlap, 4)]] + [[v, round(overlap / len(others), 4)] for v in others]


def make_classes(n: int, seed: int = 0, *, fine: float = 0.3, family: int = 2, overlap: float = 0.0,
                 names: str = "made-up") -> list[dict]:
    """``n`` class definitions: about ``fine`` of them in fine-grained families of ``family`` classes
    (one object attribute differs), about 20% in habitat pairs (identical objects, different habitats),
    the rest independent. ``overlap`` > 0 makes siblings confusable (see _blend). ``names``: made-up
    (they say nothing), or informative (a made-up name after one or two of the class's attribute words,
    as "Red-winged Blackbird", "Black-throated Blue Warbler"). The defaults draw the same classes as before these options existed."""
    if family < 2:
        raise ValueError(f"family {family}: expected at least 2")
    rng = np.random.default_rng([seed, 1])
    n_fine = family * max(1, round(fine / family * n)) if n >= 2 * family and fine > 0 else 0
    n_fine = min(n_fine, family * (n // family))
    n_habitat = 2 * round(0.1 * n) if n >= 6 else 0
    n_habitat = min(n_habitat, 2 * ((n - n_fine) // 2))
    choices = [a for a in FINE_ATTRIBUTES if family == 2 or (a != "size" and len(VOCAB[a]) >= family)]
    defs: list[tuple[dict, str]] = []
    seen: set[tuple] = set()
    names_used: set[str] = set()

    def add_group(members, group):
        sigs = [_signature(m) for m in members]
        if len(set(sigs)) < len(sigs) or any(sig in seen for sig in sigs):
            return
        seen.update(sigs)
        defs.extend((m, group) for m in members)

    while len(defs) < n_fine:
        base = _random_definition(rng)
        attribute = str(rng.choice(choices))
        members = _family(rng, base, attribute, family)
        if overlap > 0:
            _blend(members, attribute, overlap)
        add_group(members, f"fine:{attribute}")
    while len(defs) < n_fine + n_habitat:
        base = _random_definition(rng)
        base["habitat"] = [[_pick(rng, HABITATS)[0], 1.0]]
        members = [base, _sibling(rng, base, "habitat")]
        if overlap > 0:
            _blend(members, "habitat", overlap)
        add_group(members, "habitat")
    while len(defs) < n:
        defn = _random_definition(rng)
        if _signature(defn) not in seen:
            seen.add(_signature(defn))
            defs.append((defn, "single"))

    classes = []
    for defn, group in defs:
        name = made_up_name(rng)
        while name in names_used:
            name = made_up_name(rng)
        names_used.add(name)
        classes.append({"name": name, "group": group, "partner": None, "family": None, "attributes": defn})
    if names == "informative":
        name_rng = np.random.default_rng([seed, 2])  # the made-up part stays the made-up world's name
        attributes, weights = zip(*NAME_ATTRIBUTE_WEIGHTS.items())
        for c in classes:
            k = 1 + int(name_rng.random() < NAME_TWO_WORDS)
            picked = set(name_rng.choice(len(attributes), size=k, replace=False, p=np.array(weights)).tolist())
            named = [a for i, a in enumerate(attributes) if i in picked]
            words = [name_word(a, c["attributes"][a][0][0]) for a in named]
            c["name"] = " ".join(words + [c["name"]])
            c["named_attributes"] = named
    elif names != "made-up":
        raise ValueError(f"names {names!r}: expected one of {', '.join(NAME_STYLES)}")
    # groups were added side by side: families of ``family`` classes first, then habitat pairs
    starts = list(range(0, n_fine, family)) + list(range(n_fine, n_fine + n_habitat, 2))
    for f, start in enumerate(starts):
        size = family if start < n_fine else 2
        members = classes[start:start + size]
        for i, c in enumerate(members):
            c["family"] = f
            c["partner"] = members[1 - i if size == 2 else (i + 1) % size]["name"]
    return classes


def name_word(attribute: str, value: str) -> str:
    """The word an informative name carries for an attribute value: "Red", "Striped", "Crescent", "Snow"."""
    return NAME_WORDS.get(attribute, {}).get(value, value).capitalize()


def likely_values(dist: list, threshold: float = 0.15) -> list[str]:
    return [v for v, p in dist if p >= threshold]


def oracle_descriptors(cls: dict) -> tuple[list[str], list[str]]:
    """(descriptors, kinds) for a class definition: one line per object attribute, one habitat line."""
    descriptors, kinds = [], []
    for attribute in OBJECT_ATTRIBUTES:
        descriptors.append(descriptor_phrase(attribute, likely_values(cls["attributes"][attribute], 0.3)))
        kinds.append("object")
    descriptors.append(descriptor_phrase("habitat", likely_values(cls["attributes"]["habitat"])))
    kinds.append("background")
    return descriptors, kinds


def vague_descriptors(rng: np.random.Generator, cls: dict) -> tuple[list[str], list[str]]:
    """A stand-in for descriptors an LLM writes without a worked example from the domain (study 000's
    "CBD" row, Menon's lemur prompt): the oracle's object lines, each naming one more value the class
    does not have ("red or blue colouring"): true to the class, vaguer than the oracle. No habitat line."""
    descriptors = []
    for attribute in OBJECT_ATTRIBUTES:
        values = likely_values(cls["attributes"][attribute], 0.3)
        extra = _pick(rng, VOCAB[attribute], 1, exclude=values)
        mixed = values + extra
        rng.shuffle(mixed)
        descriptors.append(descriptor_phrase(attribute, mixed))
    return descriptors, ["object"] * len(descriptors)


def sample_attributes(rng: np.random.Generator, cls: dict | None, domain: str) -> dict:
    """One image's true attributes: from a class's distribution, or uniform when ``cls`` is None."""
    attrs = {}
    for attribute in ("colour", "shape", "pattern", "size", "habitat"):
        if cls is None:
            attrs[attribute] = str(rng.choice(VOCAB[attribute]))
        else:
            values, probs = zip(*cls["attributes"][attribute])
            attrs[attribute] = str(values[rng.choice(len(values), p=np.array(probs) / sum(probs))])
    attrs["domain"] = str(rng.choice(DOMAINS)) if domain == "both" else domain
    attrs["style"] = str(rng.choice(PAINT_STYLES)) if attrs["domain"] == "painting" else "photo"
    return attrs


# ----------------------------------------------------------------------------- captions

def caption(rng: np.random.Generator, attrs: dict, keep: float = 0.75) -> str:
    """A training caption naming a random subset of the attributes, in one of several forms."""
    form = rng.random()
    if form < 0.2:  # CBD-style single-attribute sentence, as descriptors are embedded
        attribute = str(rng.choice(["colour", "shape", "pattern", "size", "habitat", "colour", "shape"]))
        values = [attrs[attribute]]
        if attribute in ("colour", "habitat") and rng.random() < 0.25:  # "red or orange colouring"
            values.append(_pick(rng, VOCAB[attribute], 1, exclude=values)[0])
            rng.shuffle(values)
        phrase = descriptor_phrase(attribute, values)
        return phrase if rng.random() < 0.3 else f"{filler_subject(rng)}, {cbd_clause(phrase)}"
    show = {a: rng.random() < keep for a in ("colour", "shape", "pattern", "size", "habitat", "domain")}
    if not any(show.values()):
        show[str(rng.choice(list(show)))] = True
    words = []
    if show["size"]:
        words.append(attrs["size"])
    if show["pattern"]:
        words.append(PATTERN_ADJ[attrs["pattern"]])
    if show["colour"]:
        words.append(attrs["colour"])
    noun = attrs["shape"] if show["shape"] else str(rng.choice(["object", "thing", "shape"]))
    obj = " ".join(words + [noun])
    article = "an" if obj[0] in "aeiou" else "a"
    where = f" on {attrs['habitat']}" if show["habitat"] else ""
    if show["domain"]:
        if attrs["domain"] == "painting" and rng.random() < 0.3:
            lead = STYLE_LEAD[attrs["style"]]
        else:
            lead = DOMAIN_LEAD[attrs["domain"]]
        text = f"{lead} {article} {obj}{where}."
    elif form < 0.6:
        text = f"{article} {obj}{where}."
    else:
        text = f"there is {article} {obj}{where}."
    return text


def class_captions(cls: dict) -> list[str]:
    """Caption sentences for a class, built from its likely attribute values (no class name in them)."""
    a = cls["attributes"]
    size, pattern, shape = a["size"][0][0], PATTERN_ADJ[a["pattern"][0][0]], a["shape"][0][0]
    out = []
    for colour in likely_values(a["colour"]):
        for habitat in likely_values(a["habitat"]):
            out.append(f"a photo of a {size} {pattern} {colour} {shape} on {habitat}.")
            out.append(f"a painting of a {size} {pattern} {colour} {shape} on {habitat}.")
        out.append(f"a {pattern} {colour} {shape}.")
    for habitat in likely_values(a["habitat"]):
        out.append(f"a {size} {shape} on {habitat}.")
    return out


# ----------------------------------------------------------------------------- batches

HARD_NEGATIVE_ATTRIBUTES = ("shape", "shape", "shape", "colour", "pattern", "habitat", "size")


def sample_batch(rng: np.random.Generator, n: int, image_size: int = 64, domain: str = "both",
                 hard_negatives: float = 0.0, hard_attributes: tuple[str, ...] = HARD_NEGATIVE_ATTRIBUTES,
                 nuisance: float = 0.0) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """``n`` images with uniform random attributes -> (uint8 (n,H,W,3), bool (n,H,W), attributes).

    With ``hard_negatives`` = p, each image copies the previous one's attributes with probability p and
    changes just one, drawn from ``hard_attributes`` (shape, most often, by default), so a contrastive
    batch holds near-duplicates to tell apart. With ``nuisance`` = q, an image gets random nuisances
    (render.random_nuisance) with probability q."""
    images = np.empty((n, image_size, image_size, 3), dtype=np.uint8)
    masks = np.empty((n, image_size, image_size), dtype=bool)
    attrs_list = []
    for i in range(n):
        if i > 0 and rng.random() < hard_negatives:
            attrs = dict(attrs_list[-1])
            attribute = str(rng.choice(list(hard_attributes)))
            attrs[attribute] = _pick(rng, VOCAB[attribute], 1, exclude=[attrs[attribute]])[0]
        else:
            attrs = sample_attributes(rng, None, domain)
        extra = random_nuisance(rng) if nuisance and rng.random() < nuisance else None
        images[i], masks[i], _ = render(rng, attrs, image_size, extra)
        attrs_list.append(attrs)
    return images, masks, attrs_list


def sample_class_images(rng: np.random.Generator, classes: list[dict], per_class: int, domain: str = "photo",
                        image_size: int = 64) -> tuple[np.ndarray, np.ndarray, list[dict], list[str]]:
    """``per_class`` images of each class, class by class -> (images, masks, attributes, labels)."""
    n = len(classes) * per_class
    images = np.empty((n, image_size, image_size, 3), dtype=np.uint8)
    masks = np.empty((n, image_size, image_size), dtype=bool)
    attrs_list, labels = [], []
    for c, cls in enumerate(classes):
        for j in range(per_class):
            attrs = sample_attributes(rng, cls, domain)
            images[c * per_class + j], masks[c * per_class + j], geometry = render(rng, attrs, image_size)
            attrs_list.append({**attrs, **geometry})
            labels.append(cls["name"])
    return images, masks, attrs_list, labels
