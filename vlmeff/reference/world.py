"""A small synthetic world for the reference VLM: seeded scenes of shape-coded objects and POPE questions.

Design (see also the lessons of the first, failed world: DINOv2 patch features carry *shape* well and
colour x shape combinations poorly):

* 16 categories, each a distinct silhouette with one fixed colour, named with a single common English
  word that starts with a consonant (so "a {name}" is always grammatical).
* Categories belong to 5 *themes* (co-occurrence groups).  A scene picks a theme (non-uniform weights),
  then draws 3-6 objects, each with probability ``THEME_PROB`` from the theme (without replacement) and
  otherwise from the other categories (weighted by popularity).  Hence theme mates co-occur strongly
  (adversarial negatives exist) and marginal frequencies are clearly non-uniform (popular negatives exist).
* A category appears at most once per scene (drawn at all), so questions are unambiguous and ground truth
  is a plain set.
* Objects are mostly 28-80 px (nominal side of the shape's unit box), ~15 % are 18-28 px, rotated by up to
  +-30 degrees and placed at random; placements are re-sampled so that no earlier object loses more than
  20 % of its pixels where possible.  An object counts as *present* only if at least 60 % of its (alpha
  weighted) pixels remain visible in the final image.  Objects drawn but below that threshold stay in
  ``Scene.objects`` (with their ``visible_fraction``) but are neither present nor ever used as negatives.
* Every scene has >= 3 present categories by construction.
* ``render_scene(seed)`` is a pure function of the seed; layout and background use independent streams.

Everything is drawn with PIL at 2x and downsampled with a box filter (anti-aliasing); masks and
compositing are numpy array operations, no per-pixel Python loops.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw

__all__ = [
    "CAPTION_PROMPT",
    "CATEGORIES",
    "CATEGORY_NAMES",
    "EVAL_SEED_BASE",
    "EVAL_SEED_COUNT",
    "MIN_PRESENT",
    "POPE_SPLITS",
    "THEMES",
    "TRAIN_SEED_BASE",
    "TRAIN_SEED_COUNT",
    "VISIBLE_THRESHOLD",
    "Category",
    "ObjectInstance",
    "PopeQuestion",
    "Scene",
    "Theme",
    "TrainingExample",
    "Turn",
    "assert_disjoint_splits",
    "category",
    "eval_seeds",
    "layout_scene",
    "make_pope",
    "pope_question_text",
    "render_scene",
    "render_grid",
    "scene_caption",
    "train_seeds",
    "training_examples",
    "world_stats",
]

IMAGE_SIZE = 224
SUPERSAMPLE = 2
VISIBLE_THRESHOLD = 0.6  # an object is present iff >= 60 % of its pixels are visible
ACCEPT_VISIBLE = 0.8  # placements that leave every earlier object >= 80 % visible are accepted at once
PLACEMENT_TRIES = 12
MIN_PRESENT = 3
THEME_PROB = 0.8
NUM_OBJECTS_P = {3: 0.30, 4: 0.34, 5: 0.22, 6: 0.14}
SMALL_PROB = 0.15
SMALL_SIZE = (18.0, 28.0)
SIZE_RANGE = (28.0, 80.0)
MAX_ANGLE = 30.0

TRAIN_SEED_BASE = 0
TRAIN_SEED_COUNT = 1_000_000
EVAL_SEED_BASE = 1_000_000_000
EVAL_SEED_COUNT = 1_000_000

CAPTION_PROMPT = "List the objects in the image."
POPE_SPLITS = ("random", "popular", "adversarial")

# stream tags mixed into the seeds of the independent random streams
_LAYOUT, _BACKGROUND, _POPE, _TRAIN = 101, 202, 303, 404

Point = tuple[float, float]


# --------------------------------------------------------------------------------------------- shapes
# Every silhouette is a list of (op, polygon) primitives in unit coordinates (x right, y down, roughly
# inside [-1, 1]^2); op is "add" (fill) or "sub" (cut out), applied in order.


def _circle(cx: float, cy: float, r: float, n: int = 40) -> list[Point]:
    t = np.linspace(0.0, 2.0 * math.pi, n, endpoint=False)
    return [(cx + r * math.cos(a), cy + r * math.sin(a)) for a in t]


def _ellipse(cx: float, cy: float, rx: float, ry: float, n: int = 40) -> list[Point]:
    t = np.linspace(0.0, 2.0 * math.pi, n, endpoint=False)
    return [(cx + rx * math.cos(a), cy + ry * math.sin(a)) for a in t]


def _rect(x0: float, y0: float, x1: float, y1: float) -> list[Point]:
    return [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]


def _segment(p0: Point, p1: Point, width: float) -> list[Point]:
    dx, dy = p1[0] - p0[0], p1[1] - p0[1]
    n = math.hypot(dx, dy) or 1.0
    ox, oy = -dy / n * width / 2, dx / n * width / 2
    return [(p0[0] + ox, p0[1] + oy), (p1[0] + ox, p1[1] + oy), (p1[0] - ox, p1[1] - oy), (p0[0] - ox, p0[1] - oy)]


def _star(points: int = 5, outer: float = 1.0, inner: float = 0.42) -> list[Point]:
    out = []
    for k in range(2 * points):
        r = outer if k % 2 == 0 else inner
        a = -math.pi / 2 + k * math.pi / points
        out.append((r * math.cos(a), r * math.sin(a) + 0.08))
    return out


def _heart(n: int = 60) -> list[Point]:
    t = np.linspace(0.0, 2.0 * math.pi, n, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
    x, y = x / 17.0, (y + 2.5) / 17.0
    return list(zip(x.tolist(), y.tolist()))


def _leaf(n: int = 24) -> list[Point]:
    # a pointed leaf along the diagonal: two circular arcs meeting at the tips
    t = np.linspace(-1.0, 1.0, n)
    upper = [(float(u), float(0.42 * (1 - u * u) ** 0.9)) for u in t]
    lower = [(float(u), float(-0.42 * (1 - u * u) ** 0.9)) for u in t[::-1]]
    pts = upper + lower
    c, s = math.cos(math.radians(-45)), math.sin(math.radians(-45))
    return [(0.78 * (x * c - y * s) + 0.1, 0.78 * (x * s + y * c) - 0.1) for x, y in pts]


def _bell_body() -> list[Point]:
    right = [(0.0, -0.78), (0.22, -0.75), (0.36, -0.6), (0.42, -0.35), (0.46, -0.05), (0.55, 0.22),
             (0.72, 0.42), (0.86, 0.55), (0.86, 0.62)]
    left = [(-x, y) for x, y in reversed(right)]
    return right + left[:-1]


def _shape_ball() -> list:
    return [("add", _circle(0, 0, 0.95, 48))]


def _shape_box() -> list:
    return [("add", _rect(-0.8, -0.8, 0.8, 0.8))]


def _shape_star() -> list:
    return [("add", _star())]


def _shape_moon() -> list:
    return [("add", _circle(0, 0, 0.95, 48)), ("sub", _circle(0.5, -0.12, 0.85, 48))]


def _shape_bolt() -> list:
    return [("add", [(0.15, -1.0), (0.65, -1.0), (0.2, -0.15), (0.6, -0.15), (-0.4, 1.0), (-0.05, 0.12),
                     (-0.45, 0.12)])]


def _shape_cloud() -> list:
    return [("add", _circle(-0.5, 0.12, 0.42)), ("add", _circle(0.02, -0.18, 0.55)),
            ("add", _circle(0.52, 0.1, 0.42)), ("add", _rect(-0.5, 0.05, 0.52, 0.54))]


def _shape_flower() -> list:
    parts = [("add", _circle(0, 0, 0.36))]
    for k in range(5):
        a = -math.pi / 2 + k * 2 * math.pi / 5
        ca, sa = math.cos(a), math.sin(a)
        petal = _ellipse(0.6, 0.0, 0.38, 0.27, 28)
        parts.append(("add", [(x * ca - y * sa, x * sa + y * ca) for x, y in petal]))
    parts.append(("sub", _circle(0, 0, 0.16, 24)))
    return parts


def _shape_leaf() -> list:
    return [("add", _leaf()), ("add", _segment((-0.45, 0.45), (-0.9, 0.9), 0.13)),
            ("sub", _segment((-0.45, 0.45), (0.6, -0.6), 0.07))]


def _shape_heart() -> list:
    return [("add", _heart())]


def _shape_kite() -> list:
    body = [(0.0, -1.0), (0.58, -0.35), (0.0, 0.5), (-0.58, -0.35)]
    tail = [(0.0, 0.5), (0.18, 0.68), (0.02, 0.84), (0.2, 1.0)]
    parts = [("add", body)]
    for p0, p1 in zip(tail[:-1], tail[1:]):
        parts.append(("add", _segment(p0, p1, 0.08)))
    parts.append(("add", [(0.1, 0.72), (0.32, 0.62), (0.3, 0.84)]))
    parts.append(("add", [(0.1, 0.72), (-0.12, 0.62), (-0.1, 0.84)]))
    return parts


def _shape_key() -> list:
    return [("add", _circle(0.0, -0.58, 0.4)), ("sub", _circle(0.0, -0.58, 0.19, 28)),
            ("add", _rect(-0.1, -0.22, 0.1, 1.0)), ("add", _rect(0.1, 0.55, 0.38, 0.68)),
            ("add", _rect(0.1, 0.82, 0.32, 0.97))]


def _shape_bell() -> list:
    return [("add", _bell_body()), ("add", _circle(0.0, 0.78, 0.17, 24)),
            ("add", _circle(0.0, -0.86, 0.13, 20)), ("sub", _circle(0.0, -0.86, 0.05, 12))]


def _shape_hat() -> list:
    return [("add", _rect(-0.5, -0.75, 0.5, 0.42)), ("add", _rect(-0.95, 0.42, 0.95, 0.62)),
            ("sub", _rect(-0.51, 0.18, 0.51, 0.28))]


def _shape_cross() -> list:
    return [("add", _rect(-0.24, -0.92, 0.24, 0.92)), ("add", _rect(-0.92, -0.24, 0.92, 0.24))]


def _shape_flag() -> list:
    return [("add", _rect(-0.78, -1.0, -0.64, 1.0)),
            ("add", [(-0.64, -0.95), (0.9, -0.95), (0.55, -0.5), (0.9, -0.05), (-0.64, -0.05)])]


def _shape_triangle() -> list:
    return [("add", [(0.0, -0.95), (0.95, 0.72), (-0.95, 0.72)])]


def _rasterize(prims: Sequence[tuple[str, np.ndarray]], supersample: int = SUPERSAMPLE) -> tuple[np.ndarray, int, int]:
    """Anti-aliased coverage of (op, polygon in px) primitives: (alpha float32 [h, w] in [0, 1], x0, y0).

    Drawn at ``supersample`` x on a patch just large enough for the "add" polygons, then box-downsampled;
    the patch covers pixels ``[x0, x0 + w) x [y0, y0 + h)``.
    """
    pts = np.concatenate([p for op, p in prims if op == "add"])
    x0 = math.floor(pts[:, 0].min()) - 1
    y0 = math.floor(pts[:, 1].min()) - 1
    w = math.ceil(pts[:, 0].max()) + 1 - x0
    h = math.ceil(pts[:, 1].max()) + 1 - y0
    ss = supersample
    im = Image.new("L", (w * ss, h * ss), 0)
    d = ImageDraw.Draw(im)
    shift = np.array([x0, y0], dtype=np.float64)
    for op, poly in prims:
        q = (poly - shift) * ss
        d.polygon([tuple(p) for p in q.tolist()], fill=255 if op == "add" else 0)
    if ss > 1:
        im = im.resize((w, h), Image.Resampling.BOX)
    return np.asarray(im, dtype=np.float32) * (1.0 / 255.0), x0, y0


def _composite(img: np.ndarray, alpha: np.ndarray, x0: int, y0: int, color) -> None:
    """In place: img = img * (1 - alpha) + color * alpha over the patch at (x0, y0), clipped to img."""
    H, W = img.shape[:2]
    h, w = alpha.shape
    ax0, ay0 = max(0, -x0), max(0, -y0)
    ax1, ay1 = min(w, W - x0), min(h, H - y0)
    if ax1 <= ax0 or ay1 <= ay0:
        return
    a = alpha[ay0:ay1, ax0:ax1, None]
    region = img[y0 + ay0:y0 + ay1, x0 + ax0:x0 + ax1]
    region *= 1.0 - a
    region += a * np.asarray(color, dtype=np.float32)


# ------------------------------------------------------------------------------------------ categories


@dataclass(frozen=True)
class Category:
    """One object category: a name (single word), a fixed RGB colour and a silhouette."""

    name: str
    color: tuple[int, int, int]
    parts: tuple = field(repr=False)  # ((op, ((x, y), ...)), ...) in unit coordinates
    theme: str = ""
    index: int = -1

    def polygons(self, size: float, angle: float, center: Point = (0.0, 0.0)) -> list[tuple[str, np.ndarray]]:
        """The primitives scaled to ``size`` px (side of the unit box), rotated by ``angle`` degrees."""
        a = math.radians(angle)
        rot = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]]) * (size / 2.0)
        return [(op, np.asarray(poly, dtype=np.float64) @ rot.T + np.asarray(center)) for op, poly in self.parts]

    def draw(self, draw: ImageDraw.ImageDraw, center: Point, size: float, angle: float = 0.0,
             fill=None, erase=0) -> None:
        """Draw the silhouette on a PIL image (``fill`` defaults to the category colour, cuts use ``erase``)."""
        fill = self.color if fill is None else fill
        for op, poly in self.polygons(size, angle, center):
            draw.polygon([tuple(p) for p in poly.tolist()], fill=fill if op == "add" else erase)

    def alpha(self, size: float, angle: float = 0.0, offset: Point = (0.0, 0.0),
              supersample: int = SUPERSAMPLE) -> tuple[np.ndarray, int, int]:
        """Anti-aliased coverage patch: (alpha float32 [h, w] in [0, 1], x0, y0).

        The shape's centre sits at pixel coordinate ``offset`` (sub-pixel allowed) relative to the patch
        origin ``(x0, y0)``, i.e. the patch occupies ``[x0, x0 + w) x [y0, y0 + h)`` around the centre.
        """
        return _rasterize(self.polygons(size, angle, offset), supersample)


@dataclass(frozen=True)
class Theme:
    name: str
    categories: tuple[str, ...]
    weight: float


# (name, colour, shape, within-theme weight); themes ordered by weight
_SPEC: list[tuple[str, float, list[tuple[str, tuple[int, int, int], Callable[[], list], float]]]] = [
    ("sky", 0.30, [
        ("star", (240, 190, 0), _shape_star, 1.0),
        ("moon", (105, 115, 205), _shape_moon, 0.75),
        ("cloud", (40, 140, 225), _shape_cloud, 0.55),
        ("bolt", (245, 115, 0), _shape_bolt, 0.4),
    ]),
    ("garden", 0.23, [
        ("flower", (205, 40, 170), _shape_flower, 1.0),
        ("leaf", (95, 170, 20), _shape_leaf, 0.7),
        ("heart", (240, 105, 150), _shape_heart, 0.45),
    ]),
    ("toys", 0.20, [
        ("ball", (215, 30, 35), _shape_ball, 1.0),
        ("box", (125, 75, 35), _shape_box, 0.7),
        ("kite", (0, 150, 125), _shape_kite, 0.45),
    ]),
    ("home", 0.15, [
        ("key", (175, 140, 40), _shape_key, 1.0),
        ("bell", (120, 45, 165), _shape_bell, 0.7),
        ("hat", (30, 30, 35), _shape_hat, 0.45),
    ]),
    ("signs", 0.12, [
        ("cross", (0, 175, 205), _shape_cross, 1.0),
        ("flag", (25, 55, 130), _shape_flag, 0.7),
        ("triangle", (140, 20, 55), _shape_triangle, 0.45),
    ]),
]


def _build() -> tuple[list[Category], list[Theme], np.ndarray]:
    cats: list[Category] = []
    themes: list[Theme] = []
    weights: list[float] = []
    for tname, tweight, members in _SPEC:
        themes.append(Theme(tname, tuple(m[0] for m in members), tweight))
        for name, color, shape, w in members:
            cats.append(Category(name, color, tuple((op, tuple(map(tuple, poly))) for op, poly in shape()),
                                 tname, len(cats)))
            weights.append(w)
    return cats, themes, np.asarray(weights, dtype=np.float64)


CATEGORIES, THEMES, _WITHIN_WEIGHT = _build()
CATEGORY_NAMES: list[str] = [c.name for c in CATEGORIES]
_BY_NAME = {c.name: c for c in CATEGORIES}
_THEME_WEIGHTS = np.asarray([t.weight for t in THEMES], dtype=np.float64) / sum(t.weight for t in THEMES)
_THEME_OF = np.asarray([[t.name for t in THEMES].index(c.theme) for c in CATEGORIES])
# popularity of a category as an "other" (off-theme) pick: its theme weight times its within-theme weight
_OTHER_WEIGHT = _THEME_WEIGHTS[_THEME_OF] * _WITHIN_WEIGHT
_COLORS = np.asarray([c.color for c in CATEGORIES], dtype=np.float32)

assert len(set(CATEGORY_NAMES)) == len(CATEGORY_NAMES) >= 14
assert all(n.isalpha() and n.islower() and n[0] not in "aeiou" for n in CATEGORY_NAMES)


def category(name: str) -> Category:
    return _BY_NAME[name]


# ---------------------------------------------------------------------------------------------- scenes


@dataclass(frozen=True)
class ObjectInstance:
    """One drawn object. ``bbox`` = (x0, y0, x1, y1) px of its full (unoccluded) mask, x1/y1 exclusive."""

    category: str
    bbox: tuple[int, int, int, int]
    visible_fraction: float
    size: float = 0.0  # nominal side of the unit box, px
    angle: float = 0.0  # degrees
    center: tuple[float, float] = (0.0, 0.0)

    @property
    def present(self) -> bool:
        return self.visible_fraction >= VISIBLE_THRESHOLD


@dataclass
class Scene:
    seed: int
    image: Image.Image | None  # None for layout-only scenes (layout_scene)
    objects: list[ObjectInstance]  # in drawing order (later objects are on top)
    present: list[str]  # sorted names of the categories with visible_fraction >= VISIBLE_THRESHOLD
    caption: str

    @property
    def drawn(self) -> set[str]:
        """All drawn categories, present or (heavily) occluded; never used as negatives."""
        return {o.category for o in self.objects}


def scene_caption(objects: Sequence[ObjectInstance]) -> str:
    """'A star, a moon and a bolt.' for the present objects, left to right by bbox centre."""
    objs = sorted((o for o in objects if o.present),
                  key=lambda o: (o.bbox[0] + o.bbox[2], o.bbox[1] + o.bbox[3], o.category))
    names = [f"a {o.category}" for o in objs]
    if not names:
        return "Nothing."
    text = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
    return text[0].upper() + text[1:] + "."


def _pick(rng: np.random.Generator, weights: np.ndarray) -> int:
    """Index drawn with probability proportional to ``weights`` (faster than Generator.choice(p=...))."""
    cum = np.cumsum(weights)
    return int(min(np.searchsorted(cum, rng.random() * cum[-1], side="right"), len(cum) - 1))


_N_CHOICES = np.asarray(list(NUM_OBJECTS_P))
_N_WEIGHTS = np.asarray(list(NUM_OBJECTS_P.values()))


def _sample_categories(rng: np.random.Generator) -> list[int]:
    """Theme-biased choice of distinct category indices for one scene (the co-occurrence prior)."""
    theme = _pick(rng, _THEME_WEIGHTS)
    n = int(_N_CHOICES[_pick(rng, _N_WEIGHTS)])
    in_theme = _THEME_OF == theme
    chosen: list[int] = []
    for _ in range(n):
        avail = np.ones(len(CATEGORIES), dtype=bool)
        avail[chosen] = False
        pool = avail & in_theme
        if pool.any() and rng.random() < THEME_PROB:
            w = _WITHIN_WEIGHT * pool
        else:
            pool = avail & ~in_theme
            w = _OTHER_WEIGHT * pool
        chosen.append(_pick(rng, w))
    return chosen


def _sample_size(rng: np.random.Generator) -> float:
    lo, hi = SMALL_SIZE if rng.random() < SMALL_PROB else SIZE_RANGE
    return float(rng.uniform(lo, hi))


@dataclass
class _Placed:
    cat: int
    alpha: np.ndarray
    x0: int
    y0: int
    size: float
    angle: float
    center: tuple[float, float]
    total: float
    bbox: tuple[int, int, int, int]


def _layout(seed: int, image_size: int) -> tuple[list[_Placed], list[float]]:
    """Choose categories, sizes, angles and positions; returns placed objects and visible fractions."""
    if seed < 0:
        raise ValueError("seeds must be non-negative")
    rng = np.random.default_rng([seed, _LAYOUT])
    cats = _sample_categories(rng)
    shapes = []
    for c in cats:
        size = _sample_size(rng) * image_size / IMAGE_SIZE
        angle = float(rng.uniform(-MAX_ANGLE, MAX_ANGLE))
        frac = (float(rng.random()), float(rng.random()))
        alpha, ox, oy = CATEGORIES[c].alpha(size, angle, frac)
        shapes.append((c, size, angle, frac, alpha, ox, oy))

    for _attempt in range(50):
        placed: list[_Placed] = []
        vis_maps: list[np.ndarray] = []  # per placed object: its alpha times the transmittance of what covers it
        vis_sums: list[float] = []
        cover = np.zeros((image_size, image_size), dtype=np.float32)  # coverage by the objects placed so far
        for c, size, angle, frac, alpha, ox, oy in shapes:
            h, w = alpha.shape
            if h > image_size or w > image_size:
                raise ValueError(f"image_size {image_size} too small for an object of {size:.0f} px")
            best = None
            for _ in range(PLACEMENT_TRIES):
                x = int(rng.integers(0, image_size - w + 1))
                y = int(rng.integers(0, image_size - h + 1))
                # the new object should not sit mostly on top of others either (it would read as a pattern)
                worst = 1.0 - float((cover[y:y + h, x:x + w] * alpha).sum()) / float(alpha.sum())
                for p, vm, vs in zip(placed, vis_maps, vis_sums):
                    bx0, by0, bx1, by1 = p.bbox
                    if bx0 >= x + w or x >= bx1 or by0 >= y + h or y >= by1:
                        continue
                    lost = float((vm[y:y + h, x:x + w] * alpha).sum())
                    worst = min(worst, (vs - lost) / p.total)
                if best is None or worst > best[0]:
                    best = (worst, x, y)
                if worst >= ACCEPT_VISIBLE:
                    break
            assert best is not None
            _, x, y = best
            for j, vm in enumerate(vis_maps):
                covered = vm[y:y + h, x:x + w]
                lost = float((covered * alpha).sum())
                if lost > 0.0:
                    covered *= 1.0 - alpha
                    vis_sums[j] -= lost
            vm = np.zeros((image_size, image_size), dtype=np.float32)
            vm[y:y + h, x:x + w] = alpha
            reg = cover[y:y + h, x:x + w]
            reg += alpha * (1.0 - reg)
            vis_maps.append(vm)
            vis_sums.append(float(alpha.sum()))
            ys, xs = np.nonzero(alpha > 0.0)
            bbox = (x + int(xs.min()), y + int(ys.min()), x + int(xs.max()) + 1, y + int(ys.max()) + 1)
            placed.append(_Placed(c, alpha, x, y, size, angle, (x - ox + frac[0], y - oy + frac[1]),
                                  float(alpha.sum()), bbox))
        visible = [float(vm.sum()) / p.total for p, vm in zip(placed, vis_maps)]  # exact re-sum
        if sum(v >= VISIBLE_THRESHOLD for v in visible) >= MIN_PRESENT:
            return placed, visible
    raise RuntimeError(f"could not lay out scene {seed}")  # pragma: no cover - never observed


def _objects(placed: list[_Placed], visible: list[float]) -> list[ObjectInstance]:
    return [ObjectInstance(CATEGORIES[p.cat].name, p.bbox, round(v, 4), round(p.size, 2), round(p.angle, 2),
                           (round(p.center[0], 2), round(p.center[1], 2)))
            for p, v in zip(placed, visible)]


def _muted_color(rng: np.random.Generator, base: np.ndarray) -> tuple[int, int, int]:
    """A low-saturation colour near the background, far from every category colour."""
    for _ in range(20):
        c = base * rng.uniform(0.62, 0.85) + rng.uniform(-14, 14, 3)
        c = np.clip(c, 0, 255)
        if np.min(np.linalg.norm(_COLORS - c, axis=1)) > 70 and np.ptp(c) < 45:
            return tuple(int(v) for v in c)
    return (150, 150, 150)


def _background(seed: int, image_size: int) -> np.ndarray:
    """Light low-saturation gradient + smooth low-contrast texture + muted clutter, float32 [H, W, 3]."""
    rng = np.random.default_rng([seed, _BACKGROUND])
    s = image_size
    c0 = (rng.uniform(200, 240) + rng.uniform(-16, 16, 3)).astype(np.float32)
    c1 = np.clip(c0 + rng.uniform(-30, 30) + rng.uniform(-12, 12, 3), 180, 250).astype(np.float32)
    a = rng.uniform(0, 2 * math.pi)
    coord = np.linspace(-0.5, 0.5, s, dtype=np.float32)
    t = (np.float32(math.cos(a)) * coord[None, :] + np.float32(math.sin(a)) * coord[:, None]) + np.float32(0.5)
    k = int(rng.integers(4, 10))
    noise = Image.fromarray(rng.integers(0, 256, (k, k), dtype=np.uint8)).resize((s, s), Image.Resampling.BICUBIC)
    t = t[:, :, None]
    img = c0 + (c1 - c0) * t
    img += (np.asarray(noise, dtype=np.float32)[:, :, None] - np.float32(128.0)) * np.float32(rng.uniform(0.03, 0.09))

    # clutter: thin polylines and small irregular blobs in muted colours (2x-supersampled patches)
    base = (c0 + c1) / 2
    for _ in range(int(rng.integers(2, 6))):
        col = _muted_color(rng, base)
        x, y = rng.uniform(0, s, 2)
        length, ang = rng.uniform(20, 120), rng.uniform(0, 2 * math.pi)
        width = rng.uniform(0.7, 1.8)
        pts = [(x, y)]
        for _ in range(int(rng.integers(1, 3))):  # 1-2 segments
            ang += rng.uniform(-0.8, 0.8)
            x, y = x + length / 2 * math.cos(ang), y + length / 2 * math.sin(ang)
            pts.append((x, y))
        prims = [("add", np.asarray(_segment(p0, p1, width))) for p0, p1 in zip(pts[:-1], pts[1:])]
        _composite(img, *_rasterize(prims), col)
    for _ in range(int(rng.integers(1, 5))):
        col = _muted_color(rng, base)
        cx, cy = rng.uniform(6, s - 6, 2)
        nv = int(rng.integers(7, 11))
        ang = np.linspace(0, 2 * math.pi, nv, endpoint=False) + rng.uniform(-0.25, 0.25, nv)
        rad = rng.uniform(2.0, 5.0) * rng.uniform(0.6, 1.25, nv)
        poly = np.stack([cx + rad * np.cos(ang), cy + rad * np.sin(ang)], axis=1)
        _composite(img, *_rasterize([("add", poly)]), col)
    return img


def layout_scene(seed: int, image_size: int = IMAGE_SIZE) -> Scene:
    """The scene's ground truth without rendering the image (``image`` is None); same objects as render_scene."""
    placed, visible = _layout(seed, image_size)
    objs = _objects(placed, visible)
    return Scene(seed, None, objs, sorted(o.category for o in objs if o.present), scene_caption(objs))


def render_scene(seed: int, image_size: int = IMAGE_SIZE) -> Scene:
    """Render the scene of ``seed`` (a pure function of the seed): RGB image_size x image_size."""
    placed, visible = _layout(seed, image_size)
    img = _background(seed, image_size)
    for p in placed:
        _composite(img, p.alpha, p.x0, p.y0, _COLORS[p.cat])
    image = Image.fromarray(np.clip(img + 0.5, 0, 255).astype(np.uint8), "RGB")
    objs = _objects(placed, visible)
    return Scene(seed, image, objs, sorted(o.category for o in objs if o.present), scene_caption(objs))


def render_grid(seeds: Sequence[int], cols: int = 4, image_size: int = IMAGE_SIZE, captions: bool = True) -> Image.Image:
    """A contact sheet of scenes (with their captions underneath), for eyeballing the world."""
    rows = math.ceil(len(seeds) / cols)
    pad = 18 if captions else 0
    sheet = Image.new("RGB", (cols * (image_size + 4), rows * (image_size + 4 + pad)), (255, 255, 255))
    d = ImageDraw.Draw(sheet)
    for i, s in enumerate(seeds):
        sc = render_scene(s, image_size)
        x, y = (i % cols) * (image_size + 4), (i // cols) * (image_size + 4 + pad)
        sheet.paste(sc.image, (x, y))
        if captions:
            d.text((x + 2, y + image_size + 2), sc.caption[:42], fill=(0, 0, 0))
    return sheet


# ----------------------------------------------------------------------------------------------- splits


def train_seeds(n: int | None = None, start: int = 0) -> range:
    n = TRAIN_SEED_COUNT - start if n is None else n
    if start < 0 or start + n > TRAIN_SEED_COUNT:
        raise ValueError("outside the training seed range")
    return range(TRAIN_SEED_BASE + start, TRAIN_SEED_BASE + start + n)


def eval_seeds(n: int | None = None, start: int = 0) -> range:
    n = EVAL_SEED_COUNT - start if n is None else n
    if start < 0 or start + n > EVAL_SEED_COUNT:
        raise ValueError("outside the evaluation seed range")
    return range(EVAL_SEED_BASE + start, EVAL_SEED_BASE + start + n)


def assert_disjoint_splits(train: Sequence[int] | None = None, evaluation: Sequence[int] | None = None) -> None:
    """Assert the train and eval seed ranges (or the given seed collections) do not overlap."""
    tr = range(TRAIN_SEED_BASE, TRAIN_SEED_BASE + TRAIN_SEED_COUNT)
    ev = range(EVAL_SEED_BASE, EVAL_SEED_BASE + EVAL_SEED_COUNT)
    assert max(tr.start, ev.start) >= min(tr.stop, ev.stop), "train and eval seed ranges overlap"
    if train is not None:
        assert all(s in tr for s in train), "a training seed lies outside the training range"
    if evaluation is not None:
        assert all(s in ev for s in evaluation), "an eval seed lies outside the eval range"
    if train is not None and evaluation is not None:
        assert not set(train) & set(evaluation), "train and eval seeds overlap"


# ------------------------------------------------------------------------------------------------- POPE


def pope_question_text(name: str) -> str:
    return f"Is there a {name} in the image?"


@dataclass(frozen=True)
class PopeQuestion:
    question_id: str
    image_seed: int
    category: str
    text: str
    label: str  # "yes" | "no"
    split: str


def _stats_tables(scenes: Sequence[Scene]) -> tuple[np.ndarray, np.ndarray]:
    """Ground-truth presence frequency per category and co-occurrence counts over ``scenes``."""
    k = len(CATEGORIES)
    pres = np.zeros((len(scenes), k), dtype=np.int64)
    for i, sc in enumerate(scenes):
        pres[i, [_BY_NAME[n].index for n in sc.present]] = 1
    return pres.sum(0), pres.T @ pres


def _ranked(scores: np.ndarray, candidates: Sequence[int]) -> list[int]:
    """Candidates by descending score, ties broken by category index (deterministic)."""
    return sorted(candidates, key=lambda c: (-scores[c], c))


def make_pope(num_images: int = 500, seed_base: int = EVAL_SEED_BASE,
              questions_per_image: int = 6) -> dict[str, list[PopeQuestion]]:
    """POPE questions (Li et al. 2023) for the scenes ``seed_base .. seed_base + num_images - 1``.

    Per image ``questions_per_image // 2`` positives (sampled from the present categories, shared by the
    three splits) and the rest negatives, chosen among categories not drawn at all:
    random = uniformly; popular = most frequent in this eval set (ground-truth frequency) first;
    adversarial = most co-occurring (summed over the image's present categories, counted on this eval
    set) first.  Ties go to the lower category index.  Within an image the questions alternate yes, no,
    yes, no, ... and the negatives appear in their rank order (random ones by category index).
    """
    scenes = [layout_scene(seed_base + i) for i in range(num_images)]
    freq, cooc = _stats_tables(scenes)
    n_pos = questions_per_image // 2
    n_neg = questions_per_image - n_pos
    out: dict[str, list[PopeQuestion]] = {s: [] for s in POPE_SPLITS}
    for sc in scenes:
        rng = np.random.default_rng([sc.seed, _POPE, questions_per_image])
        present = [_BY_NAME[n].index for n in sc.present]
        absent = [c.index for c in CATEGORIES if c.name not in sc.drawn]
        if len(present) < n_pos or len(absent) < n_neg:
            raise ValueError(f"scene {sc.seed}: not enough present/absent categories")
        pos = sorted(rng.choice(present, n_pos, replace=False).tolist())
        co_score = cooc[present].sum(0)
        negs = {
            "random": sorted(rng.choice(absent, n_neg, replace=False).tolist()),
            "popular": _ranked(freq, absent)[:n_neg],
            "adversarial": _ranked(co_score, absent)[:n_neg],
        }
        for split in POPE_SPLITS:
            # yes/no interleaved as in POPE; negatives keep their rank order (popular / adversarial)
            items = [(c, "yes") for c in pos] + [(c, "no") for c in negs[split]]
            order = [k for pair in zip(range(n_pos), range(n_pos, questions_per_image)) for k in pair]
            order += list(range(2 * n_pos, questions_per_image))
            for j, idx in enumerate(order):
                c, label = items[idx]
                name = CATEGORIES[c].name
                out[split].append(PopeQuestion(f"{split}-{sc.seed}-{j}", sc.seed, name, pope_question_text(name),
                                               label, split))
    return out


# --------------------------------------------------------------------------------------------- training


@dataclass(frozen=True)
class Turn:
    question: str
    answer: str


@dataclass
class TrainingExample:
    scene: Scene
    turns: list[Turn]  # turns[0] is the caption turn, then yes/no turns (balanced)

    @property
    def seed(self) -> int:
        return self.scene.seed

    @property
    def image(self) -> Image.Image | None:
        return self.scene.image

    @property
    def caption(self) -> str:
        return self.scene.caption

    @property
    def questions(self) -> list[tuple[str, str]]:
        """The yes/no turns as (question, "Yes" | "No") pairs."""
        return [(t.question, t.answer) for t in self.turns[1:]]


@lru_cache(maxsize=1)
def _prior_cooccurrence(n: int = 6000) -> np.ndarray:
    """Co-occurrence counts of the category prior (categories drawn per scene), from a fixed sample."""
    rng = np.random.default_rng([_TRAIN, n])
    k = len(CATEGORIES)
    pres = np.zeros((n, k), dtype=np.int64)
    for i in range(n):
        pres[i, _sample_categories(rng)] = 1
    cooc = pres.T @ pres
    np.fill_diagonal(cooc, 0)
    return cooc


def training_examples(seed: int, num_yes_no: int = 6, image_size: int = IMAGE_SIZE,
                      render: bool = True) -> TrainingExample:
    """One training scene with a caption turn and ``num_yes_no`` balanced yes/no turns.

    Positives are sampled among present categories; negatives (never drawn in the scene) are half
    adversarial (sampled among the 3 absent categories co-occurring most with the present ones under the
    world prior) and half random (uniform among the other absent categories), so the answer is independent
    of the asked category's prior.  With an odd number of negatives the extra one is random or
    adversarial with probability 1/2.  Answers are exactly "Yes" / "No".  The yes/no turns are shuffled.
    """
    sc = render_scene(seed, image_size) if render else layout_scene(seed, image_size)
    rng = np.random.default_rng([seed, _TRAIN, num_yes_no])
    n_pos = min(num_yes_no // 2, len(sc.present))
    n_neg = n_pos
    present = [_BY_NAME[n].index for n in sc.present]
    absent = [c.index for c in CATEGORIES if c.name not in sc.drawn]
    pos = rng.choice(present, n_pos, replace=False).tolist()
    n_adv = n_neg // 2 + (int(rng.random() < 0.5) if n_neg % 2 else 0)
    top = _ranked(_prior_cooccurrence()[present].sum(0), absent)[: max(3, n_adv)]
    adv = rng.choice(top, n_adv, replace=False).tolist()
    rest = [c for c in absent if c not in adv]
    rnd = rng.choice(rest, n_neg - n_adv, replace=False).tolist()
    qa = [(c, "Yes") for c in pos] + [(c, "No") for c in adv + rnd]
    turns = [Turn(CAPTION_PROMPT, sc.caption)]
    turns += [Turn(pope_question_text(CATEGORIES[qa[i][0]].name), qa[i][1]) for i in rng.permutation(len(qa))]
    return TrainingExample(sc, turns)


# ------------------------------------------------------------------------------------------------ stats


def world_stats(n: int = 2000, seed_base: int = TRAIN_SEED_BASE) -> dict:
    """Statistics of ``n`` scenes, to check the prior is as designed (layout only; no images rendered)."""
    scenes = [layout_scene(seed_base + i) for i in range(n)]
    freq, cooc = _stats_tables(scenes)
    sizes = np.asarray([o.size for sc in scenes for o in sc.objects])
    edges = [18, 22, 28, 40, 52, 64, 80]
    hist, _ = np.histogram(sizes, bins=edges)
    partly = [any(o.visible_fraction < 0.999 for o in sc.objects) for sc in scenes]
    hidden = [sum(not o.present for o in sc.objects) for sc in scenes]
    answers = [t.answer for i in range(min(n, 500)) for t in training_examples(seed_base + i, render=False).turns[1:]]
    min_vis = np.asarray([min(o.visible_fraction for o in sc.objects) for sc in scenes])
    theme_cooc = {}
    for t in THEMES:
        idx = [_BY_NAME[c].index for c in t.categories]
        sub = cooc[np.ix_(idx, idx)]
        theme_cooc[t.name] = int((sub.sum() - np.trace(sub)) // 2)
    off_diag = int((cooc.sum() - np.trace(cooc)) // 2)
    return {
        "num_scenes": n,
        "category_frequency": {CATEGORIES[i].name: float(freq[i] / n) for i in np.argsort(-freq, kind="stable")},
        "mean_objects_present": float(np.mean([len(sc.present) for sc in scenes])),
        "mean_objects_drawn": float(np.mean([len(sc.objects) for sc in scenes])),
        "objects_present_hist": {k: int(sum(len(sc.present) == k for sc in scenes)) for k in range(3, 7)},
        "size_histogram": {f"{a}-{b}": int(c) for a, b, c in zip(edges[:-1], edges[1:], hist)},
        "frac_small_lt28": float(np.mean(sizes < 28)),
        "frac_scenes_with_overlap": float(np.mean(partly)),
        "frac_scenes_min_visible_lt_0.9": float(np.mean(min_vis < 0.9)),
        "frac_scenes_min_visible_lt_0.8": float(np.mean(min_vis < 0.8)),
        "frac_scenes_with_hidden_object": float(np.mean([h > 0 for h in hidden])),
        "frac_scenes_with_2plus_hidden": float(np.mean([h > 1 for h in hidden])),
        "mean_visible_fraction": float(np.mean([o.visible_fraction for sc in scenes for o in sc.objects])),
        "presence_rate": float(freq.sum() / (n * len(CATEGORIES))),
        "training_yes_rate": float(np.mean([a == "Yes" for a in answers])),
        "within_theme_pair_share": float(sum(theme_cooc.values()) / max(off_diag, 1)),
    }
