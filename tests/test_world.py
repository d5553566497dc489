"""The synthetic reference world: scenes, splits, POPE questions and training examples."""

from __future__ import annotations

import re
import time
from collections import Counter
from itertools import combinations

import numpy as np
import pytest

from vlmeff.reference import world as W

N_POPE_IMAGES = 40


@pytest.fixture(scope="module")
def pope():
    return W.make_pope(num_images=N_POPE_IMAGES)


@pytest.fixture(scope="module")
def eval_scenes():
    return [W.layout_scene(W.EVAL_SEED_BASE + i) for i in range(N_POPE_IMAGES)]


def test_categories_and_themes():
    names = [c.name for c in W.CATEGORIES]
    assert len(names) >= 14 and len(set(names)) == len(names)
    assert all(re.fullmatch(r"[a-z]+", n) for n in names)
    assert len({c.color for c in W.CATEGORIES}) == len(names)  # one fixed, distinct colour each
    members = [n for t in W.THEMES for n in t.categories]
    assert sorted(members) == sorted(names)  # every category in exactly one theme
    assert 4 <= len(W.THEMES) <= 5 and all(3 <= len(t.categories) <= 4 for t in W.THEMES)
    for c in W.CATEGORIES:
        alpha, _, _ = c.alpha(28.0, 15.0)
        assert 0.15 < alpha.mean() < 0.9 and alpha.max() > 0.99  # a real silhouette at the smallest common size


def test_render_deterministic_and_seed_dependent():
    a, b, c = W.render_scene(123), W.render_scene(123), W.render_scene(124)
    assert a.image.mode == "RGB" and a.image.size == (224, 224)
    assert a.image.tobytes() == b.image.tobytes()
    assert a.objects == b.objects and a.present == b.present and a.caption == b.caption
    assert a.image.tobytes() != c.image.tobytes()
    assert a.objects != c.objects
    lay = W.layout_scene(123)  # layout-only path gives the same ground truth
    assert lay.image is None and lay.objects == a.objects and lay.caption == a.caption


def test_seed_splits_disjoint():
    W.assert_disjoint_splits()
    tr, ev = W.train_seeds(), W.eval_seeds()
    assert tr.stop <= ev.start or ev.stop <= tr.start
    W.assert_disjoint_splits(W.train_seeds(100), W.eval_seeds(100))
    with pytest.raises(AssertionError):
        W.assert_disjoint_splits([1, 2, W.EVAL_SEED_BASE], None)
    with pytest.raises(AssertionError):
        W.assert_disjoint_splits(None, [W.EVAL_SEED_BASE, 5])


@pytest.mark.parametrize("base", [W.TRAIN_SEED_BASE, W.EVAL_SEED_BASE])
def test_scene_ground_truth(base):
    for seed in range(base, base + 60):
        sc = W.layout_scene(seed)
        cats = [o.category for o in sc.objects]
        assert len(cats) == len(set(cats))  # a category is drawn at most once
        assert len(sc.present) >= W.MIN_PRESENT
        assert sc.present == sorted(set(sc.present))
        assert sc.present == sorted(o.category for o in sc.objects if o.visible_fraction >= 0.6)
        for o in sc.objects:
            x0, y0, x1, y1 = o.bbox
            assert 0 <= x0 < x1 <= 224 and 0 <= y0 < y1 <= 224
            assert 0.0 <= o.visible_fraction <= 1.0
            assert 18.0 <= o.size <= 80.0


def test_caption_left_to_right():
    for seed in range(10):
        sc = W.layout_scene(seed)
        pres = [o for o in sc.objects if o.present]
        pres.sort(key=lambda o: o.bbox[0] + o.bbox[2])
        words = re.findall(r"\ba ([a-z]+)", sc.caption.lower())
        assert words == [o.category for o in pres]
        assert re.fullmatch(r"A [a-z]+(, a [a-z]+)* and a [a-z]+\.", sc.caption)


def test_visible_fraction_matches_pixels():
    # the object drawn last is fully visible: its colour dominates the pixels where its mask is opaque
    sc = W.render_scene(7)
    top = sc.objects[-1]
    assert top.visible_fraction == pytest.approx(1.0)
    x0, y0, x1, y1 = top.bbox
    patch = np.asarray(sc.image, dtype=np.float32)[y0:y1, x0:x1].reshape(-1, 3)
    color = np.asarray(W.category(top.category).color, dtype=np.float32)
    assert (np.abs(patch - color).max(1) < 3).mean() > 0.3


def test_pope_structure(pope, eval_scenes):
    assert set(pope) == {"random", "popular", "adversarial"}
    by_seed = {sc.seed: sc for sc in eval_scenes}
    for split, qs in pope.items():
        assert len(qs) == 6 * N_POPE_IMAGES
        assert len({q.question_id for q in qs}) == len(qs)
        per_image: dict[int, list] = {}
        for q in qs:
            assert q.split == split
            assert q.text == f"Is there a {q.category} in the image?"
            assert q.label in ("yes", "no")
            per_image.setdefault(q.image_seed, []).append(q)
        assert sorted(per_image) == sorted(by_seed)
        for seed, items in per_image.items():
            sc = by_seed[seed]
            assert [q.label for q in items] == ["yes", "no"] * 3
            assert len({q.category for q in items}) == 6
            for q in items:
                if q.label == "yes":
                    assert q.category in sc.present
                else:
                    assert q.category not in sc.drawn and q.category not in sc.present
    # positives are shared across splits
    for seed in by_seed:
        pos = [sorted(q.category for q in pope[s] if q.image_seed == seed and q.label == "yes") for s in pope]
        assert pos[0] == pos[1] == pos[2]


def test_pope_deterministic(pope):
    again = W.make_pope(num_images=N_POPE_IMAGES)
    assert again == pope
    other = W.make_pope(num_images=N_POPE_IMAGES, seed_base=W.EVAL_SEED_BASE + 1000)
    assert [q.category for q in other["random"]] != [q.category for q in pope["random"]]


def _negatives(qs, seed):
    return [q.category for q in qs if q.image_seed == seed and q.label == "no"]


def _check_ranked(chosen, scores, absent):
    """chosen are the top-len(chosen) absent categories by score, listed in non-increasing score order."""
    got = [scores[c] for c in chosen]
    assert got == sorted(got, reverse=True)
    rest = [scores[c] for c in absent if c not in chosen]
    assert not rest or max(rest) <= min(got)


def test_pope_popular_order(pope, eval_scenes):
    freq = Counter(n for sc in eval_scenes for n in sc.present)  # recomputed independently
    scores = {c.name: freq.get(c.name, 0) for c in W.CATEGORIES}
    for sc in eval_scenes:
        absent = [c.name for c in W.CATEGORIES if c.name not in sc.drawn]
        _check_ranked(_negatives(pope["popular"], sc.seed), scores, absent)


def test_pope_adversarial_order(pope, eval_scenes):
    pair = Counter()
    for sc in eval_scenes:
        for a, b in combinations(sc.present, 2):
            pair[a, b] += 1
            pair[b, a] += 1
    for sc in eval_scenes:
        absent = [c.name for c in W.CATEGORIES if c.name not in sc.drawn]
        scores = {n: sum(pair[p, n] for p in sc.present) for n in W.CATEGORY_NAMES}
        _check_ranked(_negatives(pope["adversarial"], sc.seed), scores, absent)


def test_pope_adversarial_harder_than_random(pope, eval_scenes):
    # adversarial negatives share the theme of present objects far more often than random ones
    theme = {n: t.name for t in W.THEMES for n in t.categories}
    by_seed = {sc.seed: sc for sc in eval_scenes}

    def same_theme_rate(split):
        hits = [any(theme[q.category] == theme[p] for p in by_seed[q.image_seed].present)
                for q in pope[split] if q.label == "no"]
        return np.mean(hits)

    assert same_theme_rate("adversarial") > same_theme_rate("random") + 0.2


def test_training_examples_balanced():
    labels = Counter()
    for seed in range(30):
        ex = W.training_examples(seed, render=seed < 3)
        assert (ex.scene.image is not None) == (seed < 3)
        assert ex.turns[0].question == W.CAPTION_PROMPT and ex.turns[0].answer == ex.scene.caption
        yn = ex.turns[1:]
        assert len(yn) == 6
        c = Counter(t.answer for t in yn)
        assert c == {"Yes": 3, "No": 3}
        labels.update(c)
        for t in yn:
            name = re.fullmatch(r"Is there a ([a-z]+) in the image\?", t.question).group(1)
            assert (name in ex.scene.present) == (t.answer == "Yes")
            if t.answer == "No":
                assert name not in ex.scene.drawn
        assert ex.questions == [(t.question, t.answer) for t in yn] and ex.caption == ex.scene.caption
        assert W.training_examples(seed, render=False).turns == ex.turns  # deterministic
    assert labels["Yes"] == labels["No"]


def test_world_stats_prior():
    st = W.world_stats(n=200)
    freq = st["category_frequency"]
    assert set(freq) == set(W.CATEGORY_NAMES)
    assert max(freq.values()) > 2 * min(freq.values())  # clearly non-uniform marginals
    assert 3.0 <= st["mean_objects_present"] <= 6.0
    assert 0.05 < st["frac_small_lt28"] < 0.3
    assert st["frac_scenes_with_2plus_hidden"] < 0.05
    assert st["training_yes_rate"] == pytest.approx(0.5)
    assert st["within_theme_pair_share"] > 0.3


def test_render_speed():
    W.render_scene(0)
    t = time.perf_counter()
    for seed in range(20):
        W.render_scene(seed)
    assert (time.perf_counter() - t) / 20 < 0.05  # ~5 ms here; loose bound against slow CI machines
