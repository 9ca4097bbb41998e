"""Synthetic personalization benchmark: can an adapter recover a known "person" from 10 views?

The person is a base generator plus a hidden random low-rank weight change (a rank-2 adapter with
non-zero B on the default targets) and one latent. Training photos: 10 views at yaws in [-35, 35]
degrees. Held-out: views the training never saw, including profiles (+-60, +-75, +-90) and two
pitched views. Every method gets the same anchors (each photo projected into W of the frozen base)
and renders held-out views from the mean anchor w.

Methods: no tuning (base), LoRA rank 1 (no symmetry), LoRA + symmetry, each with the LoRA factors
only and with My3DGen's trained extras (b4.const, biases, noise strengths: `--train-extras`), and full
fine-tuning of the same layers (backbone synthesis + superresolution). Reported: held-out PSNR / SSIM (and LPIPS-alex
when its verified weights are cached), mirror MSE (profile view vs the flipped opposite profile,
what the symmetry term penalizes), trainable parameters, seconds per step.

    python bench/personalize_bench.py --config tiny --steps 200 --anchor-steps 100
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

from my3dgen_cli.eg3d import build_generator
from my3dgen_cli.eg3d.camera import frontal_camera, lookat_camera
from my3dgen_cli.lora import adapter_layers, add_adapters
from my3dgen_cli.losses.perceptual import perceptual_loss
from my3dgen_cli.personalize.anchors import project_to_w
from my3dgen_cli.personalize.pipeline import PersonalizeConfig
from my3dgen_cli.personalize.symmetry import choose_distance
from my3dgen_cli.personalize.training import train_adapter

TRAIN_YAWS = torch.linspace(-35.0, 35.0, 10)
HELD_OUT = [(-90.0, 0.0), (-75.0, 0.0), (-60.0, 0.0), (60.0, 0.0), (75.0, 0.0), (90.0, 0.0),
            (20.0, 15.0), (-10.0, -15.0)]


def render(G, w, cams):
    with torch.no_grad():
        out = G.synthesis(w.expand(cams.shape[0], -1, -1), cams, noise_mode="const", sampling="deterministic")
    return out["image"], out["image_raw"]


def make_person(G, seed: int, rank: int, strength: float):
    person = copy.deepcopy(G)
    g = torch.Generator().manual_seed(seed)
    add_adapters(person, rank=rank, generator=g)
    with torch.no_grad():
        for a in adapter_layers(person).values():
            a.lora_B.normal_(0.0, strength, generator=g)
        z = torch.randn(1, G.z_dim, generator=g)
        w = G.mapping(z, frontal_camera(1), truncation_psi=0.7)
    return person.eval(), w


def mirror_inconsistency(G, w, cams):
    """Mean MSE between each view and the flipped view from the mirror camera (0 = symmetric face)."""
    from my3dgen_cli.personalize.symmetry import mirror_pair

    with torch.no_grad():
        a, b = mirror_pair(G, w.expand(cams.shape[0], -1, -1), cams)
    return float(((a - b) ** 2).mean())


def metrics(pred, target, lpips):
    from skimage.metrics import structural_similarity

    mse = ((pred - target) ** 2).flatten(1).mean(1)
    psnr = float((10 * torch.log10(4.0 / mse)).mean())  # images in [-1, 1]: peak-to-peak 2
    a = ((pred + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    b = ((target + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    ssim = sum(structural_similarity(x, y, channel_axis=2, data_range=1.0) for x, y in zip(a, b, strict=True)) / len(a)
    lp = float(lpips(pred, target).mean()) if lpips is not None else None
    return psnr, float(ssim), lp


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="tiny")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--anchor-steps", type=int, default=100)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--person-rank", type=int, default=2)
    ap.add_argument("--person-strength", type=float, default=0.7)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    base = build_generator(args.config).to(device)
    person, w_true = make_person(base, args.seed + 100, args.person_rank, args.person_strength)
    train_cams = lookat_camera(TRAIN_YAWS, 0.0).to(device)
    test_cams = lookat_camera(torch.tensor([y for y, _ in HELD_OUT]), torch.tensor([p for _, p in HELD_OUT])).to(device)
    photos, raws = render(person, w_true, train_cams)
    target, _ = render(person, w_true, test_cams)
    lpips = perceptual_loss("alex", required=False)
    lpips = lpips.to(device) if lpips is not None else None

    t0 = time.perf_counter()
    anchors = project_to_w(base, photos, train_cams, args.anchor_steps, lpips=lpips)
    anchor_s = time.perf_counter() - t0
    w_mean = anchors.mean(0, keepdim=True)

    rows = []
    pred, _ = render(base, w_mean, test_cams)
    sym_cams = test_cams[:3]  # yaw -90, -75, -60 against +90, +75, +60
    base_mirror = mirror_inconsistency(base, w_mean, sym_cams)
    rows.append(("no tuning", *metrics(pred.cpu(), target.cpu(), lpips), 0, None, base_mirror))
    sym_distance = choose_distance("id", None, lpips)
    methods = (("LoRA r1 (factors only)", False, False, False), ("LoRA r1 + extras", False, True, False),
               ("LoRA r1 + sym (factors only)", True, False, False), ("LoRA r1 + extras + sym", True, True, False),
               ("full fine-tune", False, False, True))
    for label, sym, extras, full in methods:
        G = copy.deepcopy(base)
        params = None
        if full:
            params = [p for n, p in G.named_parameters() if n.startswith(("backbone.synthesis.", "superresolution."))]
        config = PersonalizeConfig(steps=args.steps, batch=args.batch, sym=sym, seed=args.seed, checkpoint_every=0,
                                   train_extras=extras)
        result = train_adapter(G, photos, train_cams, anchors, config, lpips=lpips, sym_distance=sym_distance,
                               params=params, raw_images=raws)
        pred, _ = render(G, w_mean, test_cams)
        rows.append((label, *metrics(pred.cpu(), target.cpu(), lpips), result.parameters,
                     result.seconds / max(result.steps, 1), mirror_inconsistency(G, w_mean, sym_cams)))

    print(f"config {args.config}, person: rank-{args.person_rank} hidden adapter (B ~ N(0, {args.person_strength}^2)), "
          f"{len(TRAIN_YAWS)} training views (yaw -35..35), {len(HELD_OUT)} held-out views "
          f"(yaw +-60/75/90, two pitched), {args.steps} steps, batch {args.batch}, anchors {args.anchor_steps} steps "
          f"({anchor_s:.0f} s), symmetry distance {sym_distance.kind}, LPIPS "
          f"{'alex' if lpips is not None else 'not cached (training uses pixel losses)'}")
    print()
    print(f"(person's own mirror inconsistency: {mirror_inconsistency(person, w_true, sym_cams):.4f})")
    print()
    print("| method | held-out PSNR (dB) | held-out SSIM | held-out LPIPS | mirror MSE | trainable params | s/step |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for label, psnr, ssim, lp, n, sps, mirror in rows:
        lp_s = f"{lp:.4f}" if lp is not None else "n/a"
        sps_s = f"{sps:.3f}" if sps is not None else "-"
        print(f"| {label} | {psnr:.2f} | {ssim:.4f} | {lp_s} | {mirror:.4f} | {n:,} | {sps_s} |")


if __name__ == "__main__":
    main()
