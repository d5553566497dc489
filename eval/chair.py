"""CHAIR (Caption Hallucination Assessment with Image Relevance, Rohrbach et al. 2018) for `vlmeff eval --benchmark
chair`: caption images, find the object words of each caption, and compare them with the image's objects.

- CHAIR_I = hallucinated object mentions / all object mentions; CHAIR_S = captions with at least one hallucinated
  mention / captions; recall = distinct true objects mentioned / true objects (over all images); mean length =
  words per caption. Every mention counts (a caption that names "a box" twice has two mentions), as in the original
  code; plurals ("boxes") and synonyms map to the category; the longest phrase wins ("hot dog" before "dog").
- Reference model (default): held-out synthetic scenes (seeds disjoint from training and from POPE), ground truth =
  the scene's exact objects. A mention is a hallucination when the category was not drawn at all; a drawn but
  mostly occluded object is neither required (recall counts the present ones) nor a hallucination.
- COCO val2014 (`--data instances_val2014.json [--captions captions_val2014.json] --image-dir val2014/`): ground
  truth = the instance annotations' categories, plus the categories the human captions mention (the original
  protocol); 500 images by default, the first ones by image id after a seeded shuffle. The synonym table is
  vlmeff's own (`COCO_SYNONYMS`).
Scores depend heavily on the prompt and the caption length, so both are in every table.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

REFERENCE_PROMPT = "List the objects in the image."  # the reference model's trained caption turn
COCO_PROMPT = "Please describe this image in detail."  # the prompt of the OPERA / PAI CHAIR evaluations
REFERENCE_MAX_NEW_TOKENS = 48
COCO_MAX_NEW_TOKENS = 512
SYNTHETIC_PREFIX = "synthetic:"
CHAIR_SEED_START = 100_000  # offset into the world's evaluation seeds (POPE uses the first ones)

# vlmeff's synonym table for the 80 COCO categories (category: other words or phrases for it).
COCO_SYNONYMS: dict[str, list[str]] = {
    "person": ["people", "man", "men", "woman", "women", "boy", "girl", "child", "children", "kid", "baby", "player",
               "skier", "surfer", "skateboarder", "rider", "lady", "guy", "person", "persons", "adult", "teenager",
               "pedestrian", "snowboarder", "batter", "catcher", "pitcher", "tennis player", "biker", "cyclist"],
    "bicycle": ["bike", "bicycle", "cycle"], "car": ["car", "automobile", "taxi", "suv", "sedan", "van"],
    "motorcycle": ["motorcycle", "motorbike", "motor bike", "scooter", "moped"], "airplane": ["airplane", "plane",
    "jet", "aircraft", "airliner"], "bus": ["bus", "trolley"], "train": ["train", "locomotive", "tram", "subway"],
    "truck": ["truck", "pickup", "lorry"], "boat": ["boat", "ship", "kayak", "canoe", "sailboat", "yacht", "ferry"],
    "traffic light": ["traffic light", "stop light", "traffic signal", "stoplight"],
    "fire hydrant": ["fire hydrant", "hydrant"], "stop sign": ["stop sign"], "parking meter": ["parking meter"],
    "bench": ["bench"], "bird": ["bird", "duck", "pigeon", "seagull", "gull", "goose", "parrot", "owl", "swan"],
    "cat": ["cat", "kitten", "kitty"], "dog": ["dog", "puppy", "pup"], "horse": ["horse", "pony", "foal"],
    "sheep": ["sheep", "lamb", "ram"], "cow": ["cow", "cattle", "bull", "calf", "oxen", "ox"],
    "elephant": ["elephant"], "bear": ["bear", "polar bear", "grizzly"], "zebra": ["zebra"],
    "giraffe": ["giraffe"], "backpack": ["backpack", "back pack", "knapsack"], "umbrella": ["umbrella", "parasol"],
    "handbag": ["handbag", "purse", "hand bag"], "tie": ["tie", "necktie", "bow tie"],
    "suitcase": ["suitcase", "luggage", "suit case"], "frisbee": ["frisbee"], "skis": ["skis", "ski"],
    "snowboard": ["snowboard"], "sports ball": ["ball", "baseball", "football", "soccer ball", "tennis ball",
    "basketball", "volleyball"], "kite": ["kite"], "baseball bat": ["baseball bat", "bat"],
    "baseball glove": ["baseball glove", "glove", "mitt"], "skateboard": ["skateboard"],
    "surfboard": ["surfboard", "surf board"], "tennis racket": ["tennis racket", "racket", "racquet"],
    "bottle": ["bottle"], "wine glass": ["wine glass"], "cup": ["cup", "mug"], "fork": ["fork"],
    "knife": ["knife", "knives"], "spoon": ["spoon"], "bowl": ["bowl"], "banana": ["banana"], "apple": ["apple"],
    "sandwich": ["sandwich", "burger", "hamburger", "sub"], "orange": ["orange"], "broccoli": ["broccoli"],
    "carrot": ["carrot"], "hot dog": ["hot dog", "hotdog"], "pizza": ["pizza"], "donut": ["donut", "doughnut"],
    "cake": ["cake", "cupcake"], "chair": ["chair", "stool", "armchair"], "couch": ["couch", "sofa"],
    "potted plant": ["potted plant", "house plant", "houseplant", "plant"], "bed": ["bed"],
    "dining table": ["table", "dining table", "desk"], "toilet": ["toilet"], "tv": ["tv", "television", "monitor"],
    "laptop": ["laptop", "computer", "notebook computer"], "mouse": ["mouse"], "remote": ["remote", "controller"],
    "keyboard": ["keyboard"], "cell phone": ["cell phone", "phone", "cellphone", "smartphone", "mobile phone"],
    "microwave": ["microwave"], "oven": ["oven", "stove"], "toaster": ["toaster"], "sink": ["sink"],
    "refrigerator": ["refrigerator", "fridge"], "book": ["book", "novel"], "clock": ["clock"], "vase": ["vase"],
    "scissors": ["scissors"], "teddy bear": ["teddy bear", "teddy", "stuffed animal"],
    "hair drier": ["hair drier", "hair dryer", "hairdryer", "blow dryer"], "toothbrush": ["toothbrush"],
}

# synonyms for the reference world's categories (its captions use the category names themselves)
REFERENCE_SYNONYMS: dict[str, list[str]] = {
    "ball": ["sphere", "orb"], "box": ["cube", "crate"], "moon": ["crescent"], "bolt": ["lightning"],
    "flower": ["blossom"], "triangle": ["pyramid"],
}

_IRREGULAR = {"people": "person", "men": "man", "women": "woman", "children": "child", "knives": "knife",
              "leaves": "leaf", "mice": "mouse", "geese": "goose", "oxen": "ox", "feet": "foot"}
_UNCHANGED = {"sheep", "skis", "scissors", "bus", "cross", "grass", "glass", "species"}


def singular(word: str) -> str:
    """A plural English noun's singular by simple rules (irregulars first): boxes -> box, berries -> berry."""
    if word in _IRREGULAR:
        return _IRREGULAR[word]
    if word in _UNCHANGED or len(word) <= 3 or not word.endswith("s") or word.endswith("ss"):
        return word
    if word.endswith("ies"):
        return word[:-3] + "y"
    if word.endswith(("ches", "shes", "xes", "sses", "zes", "oes")):
        return word[:-2]
    return word[:-1]


class ObjectVocabulary:
    """Maps words and phrases (singular or plural) of captions to object categories."""

    def __init__(self, synonyms: dict[str, Iterable[str]]):
        self.phrases: dict[tuple[str, ...], str] = {}
        for cat, words in synonyms.items():
            for phrase in {cat, *words}:
                self.phrases[tuple(singular(w) for w in phrase.lower().split())] = cat
        self.longest = max(len(p) for p in self.phrases)

    @classmethod
    def reference(cls) -> ObjectVocabulary:
        from vlmeff.reference.world import CATEGORY_NAMES

        return cls({name: REFERENCE_SYNONYMS.get(name, []) for name in CATEGORY_NAMES})

    @classmethod
    def coco(cls) -> ObjectVocabulary:
        return cls(COCO_SYNONYMS)

    def mentions(self, caption: str) -> list[str]:
        """The categories the caption names, one entry per mention, in order (longest phrase first)."""
        words = [singular(w) for w in re.findall(r"[a-z]+", caption.lower())]
        out, i = [], 0
        while i < len(words):
            for n in range(min(self.longest, len(words) - i), 0, -1):
                cat = self.phrases.get(tuple(words[i:i + n]))
                if cat is not None:
                    out.append(cat)
                    i += n
                    break
            else:
                i += 1
        return out


@dataclass
class ChairSample:
    """One image to caption: `objects` are the true categories (recall counts them), `allowed` those whose mention
    is not a hallucination (a superset: e.g. occluded objects of a synthetic scene)."""

    question_id: str  # the image id (named like POPE's for the shared runner)
    image: str | None
    image_id: str
    objects: set[str]
    allowed: set[str] = field(default_factory=set)
    split: str = "caption"

    def __post_init__(self):
        self.allowed = set(self.allowed) | set(self.objects)


def hallucinated_captions(captions: Sequence[str], samples: Sequence[ChairSample], vocab: ObjectVocabulary
                          ) -> list[bool]:
    """Per caption: whether it mentions at least one object that is not in its image (what CHAIR_S counts)."""
    return [any(c not in s.allowed for c in vocab.mentions(cap)) for cap, s in zip(captions, samples)]


def paired_change(base: Sequence[bool], other: Sequence[bool]) -> tuple[int, int, float]:
    """(captions fixed, captions newly hallucinated, two-sided exact sign-test p) of `other` against `base` over the
    same images: the paired view of a CHAIR_S difference (discordant pairs only)."""
    fixed = sum(b and not o for b, o in zip(base, other))
    new = sum(o and not b for b, o in zip(base, other))
    n, low = fixed + new, min(fixed, new)
    if n == 0:
        return fixed, new, 1.0
    tail = sum(math.comb(n, i) for i in range(low + 1)) / 2 ** n
    return fixed, new, min(1.0, 2 * tail)


def chair_scores(captions: Sequence[str], samples: Sequence[ChairSample], vocab: ObjectVocabulary) -> dict:
    """CHAIR_S, CHAIR_I, recall and mean length (words) of `captions` for `samples` (same order), in [0, 1]."""
    if len(captions) != len(samples):
        raise ValueError(f"{len(captions)} captions for {len(samples)} images")
    mentions = hallucinated = bad_captions = covered = truths = words = 0
    for caption, sample in zip(captions, samples):
        found = vocab.mentions(caption)
        wrong = [c for c in found if c not in sample.allowed]
        mentions += len(found)
        hallucinated += len(wrong)
        bad_captions += bool(wrong)
        covered += len(set(found) & sample.objects)
        truths += len(sample.objects)
        words += len(re.findall(r"\S+", caption))
    n = max(1, len(samples))
    return {"chair_s": bad_captions / n, "chair_i": hallucinated / max(1, mentions), "recall": covered / max(1, truths),
            "mean_length": words / n, "mentions": mentions, "n": len(samples)}


def load_synthetic_chair(num_images: int = 100, start: int = CHAIR_SEED_START) -> list[ChairSample]:
    """Held-out synthetic scenes (world evaluation seeds from `start`, disjoint from POPE's and training's)."""
    from vlmeff.reference import world

    out = []
    for seed in world.eval_seeds(num_images, start=start):
        scene = world.layout_scene(seed)
        out.append(ChairSample(question_id=str(seed), image=f"{SYNTHETIC_PREFIX}{seed}", image_id=str(seed),
                               objects=set(scene.present), allowed=scene.drawn))
    return out


def _read_json(path: Path, option: str):
    """The JSON in `path`, or a ValueError naming the option, the file and (for bad JSON) the line."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ValueError(f"{option} {path}: cannot be read ({e.strerror})") from None
    if not data.strip():
        raise ValueError(f"{option} {path}: the file is empty")
    try:
        return json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise ValueError(f"{option} {path}, line {line}: not UTF-8 text (byte 0x{data[e.start]:02x})") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{option} {path}, line {e.lineno}: not valid JSON ({e.msg}, column {e.colno})") from None


def _inside(folder: Path, name: str, source: Path) -> str:
    """`folder / name`, refusing a file name that leaves the folder (absolute, or '..' above it)."""
    base = os.path.normpath(folder)
    full = os.path.normpath(os.path.join(base, name))
    if os.path.isabs(name) or not full.startswith(base.rstrip(os.sep) + os.sep):
        raise ValueError(f"--data {source}: image file_name {name!r} is outside the image folder {folder} (a data "
                         "file may only name files inside it)")
    return str(folder / name)


def load_coco_chair(instances: str | Path, image_dir: str | Path | None, captions: str | Path | None = None,
                    num_images: int = 500, seed: int = 0, *, check_images: bool = True) -> list[ChairSample]:
    """COCO images with their instance categories (plus the categories their human captions mention). Errors name
    the file (and line); with `image_dir`, file names must stay inside it and (`check_images`) the chosen images
    must exist: a missing one fails here, not after the model has loaded."""
    path = Path(instances)
    if not path.is_file():
        raise FileNotFoundError(f"--data {path}: not a file; give COCO's instances_val2014.json")
    data = _read_json(path, "--data")
    try:
        names = {c["id"]: c["name"] for c in data["categories"]}
        files = {im["id"]: im["file_name"] for im in data["images"]}
        objects: dict[int, set[str]] = {i: set() for i in files}
        for ann in data["annotations"]:
            objects.setdefault(ann["image_id"], set()).add(names[ann["category_id"]])
    except (KeyError, TypeError) as e:
        raise ValueError(f"--data {path}: not a COCO instances file ({type(e).__name__}: {e})") from None
    if not files:
        raise ValueError(f"--data {path}: lists no images")
    if captions is not None:
        vocab = ObjectVocabulary.coco()
        try:
            for ann in _read_json(Path(captions), "--captions")["annotations"]:
                if ann["image_id"] in objects:
                    objects[ann["image_id"]].update(vocab.mentions(ann["caption"]))
        except (KeyError, TypeError) as e:
            raise ValueError(f"--captions {captions}: not a COCO captions file ({type(e).__name__}: {e})") from None
    ids = sorted(files)
    random.Random(seed).shuffle(ids)
    chosen = sorted(ids[:num_images])
    folder = Path(image_dir) if image_dir is not None else None
    samples = [ChairSample(question_id=str(i), image=_inside(folder, files[i], path) if folder else files[i],
                           image_id=Path(files[i]).stem, objects=objects[i]) for i in chosen]
    if folder is not None and check_images:
        missing = [s.image for s in samples if not Path(s.image).is_file()]
        if missing:
            raise FileNotFoundError(f"--image-dir {folder}: {len(missing)} of the {len(samples)} chosen images are "
                                    f"missing (first: {missing[0]})")
    return samples
