"""The tiny corpus shipped with the package, and the generator that wrote it.

``tiny_corpus.jsonl.zst`` (next to this file) is Pile-format JSON lines ({"text": ...}) of
procedurally generated English-like documents: short stories, dialogues, inventories and
arithmetic drills over a small lexicon of our own, seeded so the file is reproducible. The
documents repeat names, places and key-value facts within themselves, so a small model has
in-context structure to learn (the recall the synthetic tasks measure), not only word
statistics. Regenerate with ``python -m sandbox.data.tiny_corpus`` (writes the file in place).

It is the corpus of the README's quick start and of configs/pretrain/tiny.yaml:
``sandbox prepare-data --tiny-corpus --tokenizer bytes --out data/tiny``.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

TINY_CORPUS = Path(__file__).with_name("tiny_corpus.jsonl.zst")
DOCUMENTS = 2500

NAMES = "Ada Bruno Cleo Dario Edda Fenn Greta Hugo Ines Jonas Kira Lior Mira Nico Odile".split()
ANIMALS = "otter heron badger fox hare wren beaver lynx mole stoat owl newt".split()
COLORS = "red blue green amber silver grey white black golden violet".split()
OBJECTS = "key lantern stone map bell ribbon compass cup feather coin whistle box".split()
PLACES = "river mill orchard harbour valley meadow forest quarry island market".split()
SPOTS = "old bridge|tall oak|broken wall|stone well|willow tree|red barn|narrow gate".split("|")
PREPS = "under|behind|beside|near|inside|on top of".split("|")
MOODS = "laughed|frowned|nodded slowly|clapped|looked puzzled|smiled".split("|")
TIMES = "morning|evening|rainy afternoon|cold night|bright day".split("|")
NUMBERS = "zero one two three four five six seven eight nine ten eleven twelve".split()


def _a(word: str) -> str:
    return f"{'an' if word[0] in 'aeiou' else 'a'} {word}"


def _plural(word: str) -> str:
    return word + ("es" if word.endswith(("s", "x", "h")) else "s")


def _story(r: random.Random) -> str:
    a, b = r.sample(NAMES, 2)
    animal, color, obj = r.choice(ANIMALS), r.choice(COLORS), r.choice(OBJECTS)
    place, spot, prep = r.choice(PLACES), r.choice(SPOTS), r.choice(PREPS)
    lines = [
        f"{a} the {animal} lived by the {place}.",
        f"One {r.choice(TIMES)}, {a} found {_a(color)} {obj} {prep} the {spot}.",
        f"{a} showed the {color} {obj} to {b}, who {r.choice(MOODS)}.",
    ]
    for _ in range(r.randrange(1, 4)):
        other = r.choice(OBJECTS)
        lines.append(
            f"{b} had seen {_a(r.choice(COLORS))} {other} near the {r.choice(PLACES)} "
            f"{NUMBERS[r.randrange(2, 13)]} days before."
        )
    lines.append(f'"Put it back {prep} the {spot}," said {b}.')
    lines.append(f"So {a} carried the {color} {obj} back to the {spot} and left it there.")
    lines.append(f"Where is the {color} {obj}? It is {prep} the {spot}, by the {place}.")
    return " ".join(lines)


def _dialogue(r: random.Random) -> str:
    keeper, visitor = r.sample(NAMES, 2)
    rooms = r.sample(["attic", "cellar", "library", "kitchen", "tower", "garden shed"], 3)
    colors = r.sample(COLORS, 3)
    lines = [f"{visitor}: Good {r.choice(TIMES).split()[-1]}. I need to open some doors."]
    for color, room in zip(colors, rooms):
        lines.append(f"{keeper}: The {color} key opens the {room}.")
    for color, room in r.sample(list(zip(colors, rooms)), 3):
        lines.append(f"{visitor}: Which key opens the {room}?")
        lines.append(f"{keeper}: The {color} key opens the {room}.")
    lines.append(f"{visitor}: Thank you, {keeper}.")
    return "\n".join(lines)


def _inventory(r: random.Random) -> str:
    place = r.choice(PLACES)
    items = r.sample(OBJECTS, r.randrange(2, 6))
    counts = [r.randrange(1, 10) for _ in items]
    lines = [f"Inventory of the {place} store:"]
    lines += [
        f"- {NUMBERS[n]} {r.choice(COLORS)} {_plural(o) if n > 1 else o}"
        for o, n in zip(items, counts)
    ]
    lines.append(f"Total: {sum(counts)} items, counted by {r.choice(NAMES)}.")
    return "\n".join(lines)


def _arithmetic(r: random.Random) -> str:
    lines = []
    for _ in range(r.randrange(3, 8)):
        x, y = r.randrange(0, 50), r.randrange(0, 50)
        if r.random() < 0.5:
            lines.append(f"Q: What is {x} plus {y}?\nA: {x} plus {y} is {x + y}.")
        else:
            x, y = max(x, y), min(x, y)
            lines.append(f"Q: What is {x} minus {y}?\nA: {x} minus {y} is {x - y}.")
    return "\n".join(lines)


KINDS = (_story, _story, _dialogue, _inventory, _arithmetic)


def documents(n: int = DOCUMENTS, seed: int = 0) -> list[str]:
    """``n`` documents, the same for the same (n, seed)."""
    r = random.Random(seed)
    return ["\n\n".join(r.choice(KINDS)(r) for _ in range(r.randrange(1, 4))) for _ in range(n)]


def write(path: Path = TINY_CORPUS) -> None:
    import zstandard

    lines = "".join(json.dumps({"text": t}) + "\n" for t in documents())
    path.write_bytes(zstandard.ZstdCompressor(level=19).compress(lines.encode()))
    print(f"{path}: {len(lines):,} bytes of JSON lines, {path.stat().st_size:,} compressed")


if __name__ == "__main__":
    write(Path(sys.argv[1]) if len(sys.argv) > 1 else TINY_CORPUS)
