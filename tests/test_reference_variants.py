"""The attention fine-tunes shipped in assets/reference/attention (issue 17; docs/results.md): each loads by name
(`vlmeff.load("reference-<variant>")`) and, with its strategy, reproduces the caption recorded when it was exported,
on a fixed held-out scene (SAISA with its shipped projectors, assets/reference/saisa_projectors.safetensors, the
strategy's default weights); an unknown variant is refused naming the shipped ones."""

from __future__ import annotations

import pytest

import vlmeff
from vlmeff.reference.model import ASSET_NAME, asset_dir
from vlmeff.reference.weights import PART_DIRS, cache_dir

CACHE_READY = all((cache_dir() / d).is_dir() for d in PART_DIRS.values())
pytestmark = [
    pytest.mark.skipif(not (asset_dir() / ASSET_NAME).is_file(), reason="no trained reference weights in assets/"),
    pytest.mark.skipif(not CACHE_READY, reason="pretrained parts not converted yet: run `vlmeff reference fetch`"),
]

SCENE = 1_000_000_321  # held out from training (the train range is 0..num_scenes-1)
# variant -> (strategy it was trained with, greedy caption recorded at export, 24 new tokens at most)
RECORDED = {
    "control": (None, "A flag, a cross, a triangle, a box and a key."),
    "cca": ("cca", "A flag, a cross, a triangle, a box and a ball."),
    "mma": ("mma", "A cross, a flag, a triangle, a box and a key."),
    "naavit": ("naavit", "A flag, a triangle, a box and a ball."),
    "saisa": ("saisa", "A cross, a flag, a triangle, a ball and a box."),  # its projectors: the default saisa weights
}


@pytest.mark.parametrize("variant", list(RECORDED))
def test_shipped_variant_reproduces_its_recorded_caption(variant):
    from vlmeff.reference.world import render_scene

    spec, caption = RECORDED[variant]
    model, processor = vlmeff.load(f"reference-{variant}")
    with vlmeff.wrap(model, processor, spec) as vm:
        assert vm.chat(render_scene(SCENE).image, "List the objects in the image.", max_new_tokens=24) == caption


def test_every_shipped_variant_is_recorded_and_unknown_ones_are_refused():
    shipped = sorted(p.stem for p in (asset_dir() / "attention").glob("*.safetensors"))
    assert shipped == sorted(RECORDED)
    with pytest.raises(FileNotFoundError, match="reference-cca"):
        vlmeff.load("reference-nope")


def test_a_runs_weights_file_loads_by_path(tmp_path):
    """`reference:<file>` loads a training run's weights without exporting them (here: the shipped cca file)."""
    import torch

    by_name, _ = vlmeff.load("reference-cca")
    by_path, _ = vlmeff.load(f"reference:{asset_dir() / 'attention' / 'cca.safetensors'}")
    for (name, a), b in zip(by_name.state_dict().items(), by_path.state_dict().values()):
        assert torch.equal(a, b), name  # every tensor, the added <image> row too (zeros, not drawn per load)
    with pytest.raises(FileNotFoundError, match="no trained weights file at"):
        vlmeff.load(f"reference:{tmp_path / 'none.safetensors'}")
