"""Shared by the personalization tests: a tiny base, a hidden "person", its rendered views on disk.

The "person" is the tiny base plus a hidden rank-1 adapter with non-zero B; its views (with the
true latent as anchor) are the training photos.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch

from my3dgen_cli.eg3d import build_generator
from my3dgen_cli.eg3d.camera import frontal_camera, lookat_camera
from my3dgen_cli.lora import adapter_layers, add_adapters

TRAIN_YAWS = [-40.0, -28.0, -17.0, -6.0, 6.0, 17.0, 28.0, 40.0]


def tiny_base(seed: int = 0):
    torch.manual_seed(seed)
    return build_generator("tiny")


def make_person(seed: int = 0):
    """(base state dict, true w [1, num_ws, w_dim], person generator with a hidden adapter)."""
    G = tiny_base(seed)
    hidden = copy.deepcopy(G)
    g = torch.Generator().manual_seed(123)
    add_adapters(hidden, rank=1, generator=g)
    with torch.no_grad():
        for a in adapter_layers(hidden).values():
            a.lora_B.normal_(0.0, 1.0, generator=g)
        w = G.mapping(torch.randn(1, G.z_dim, generator=torch.Generator().manual_seed(7)), frontal_camera(1), 0.7)
    return {k: v.clone() for k, v in G.state_dict().items()}, w, hidden


def fresh(person):
    """A tiny base with the person's base weights (no adapter)."""
    G = tiny_base()
    G.load_state_dict(person[0])
    return G


def views(M, w, yaws):
    """(image, raw rgb, cameras) of latent w from yaws (pitch 0), deterministic sampling."""
    c = lookat_camera(torch.tensor(yaws), 0.0)
    with torch.no_grad():
        out = M.synthesis(w.expand(len(yaws), -1, -1), c, noise_mode="const", sampling="deterministic")
    return out["image"], out["image_raw"], c


def write_photos(person, folder: Path, yaws) -> Path:
    """The person's views as PNGs plus an EG3D dataset.json (aligned crops with known cameras)."""
    from my3dgen_cli.personalize.reports import to_pil

    _, w, hidden = person
    images, _, cams = views(hidden, w, yaws)
    folder.mkdir(parents=True, exist_ok=True)
    labels = []
    for i, (img, cam) in enumerate(zip(images, cams, strict=True)):
        to_pil(img).save(folder / f"view{i}.png")
        labels.append([f"view{i}.png", [float(v) for v in cam]])
    (folder / "dataset.json").write_text(json.dumps({"labels": labels}))
    return folder
