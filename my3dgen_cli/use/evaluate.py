"""`my3dgen eval`: how much better does an identity's prior explain held-out photos than the base?

For every held-out photo (a crop with its camera), the photo is inverted twice with the same
settings and the same start (the identity's mean anchor): under the frozen base and under the
base + the identity's adapter. Each reconstruction is scored against the photo:

    psnr    dB, images in [0, 1] (metrics.psnr)            higher is better
    ssim    11x11 Gaussian window (metrics.ssim)            higher is better
    lpips   LPIPS-alex (when its backbone is cached)        lower is better
    id      ArcFace IR-SE50 cosine (when it is cached)      higher is better

Multi-view consistency of each model: the first photo's latent rendered at yaw +a and -a; the
second view is flipped and compared with the first (LPIPS, else RMSE in [-1, 1]); for a
left-right symmetric head a consistent 3-D model gives 0. With ArcFace, also the identity
similarity of each turned view to the frontal one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

MODELS = ("base", "personalized")
CONSISTENCY_YAWS = (15.0, 30.0, 45.0)
# Photos inverted together (invert_images): one render per step for several photos keeps a CPU's cores
# busy; 4 bounds the memory of a full-size batch with its gradients.
INVERT_BATCH = 4


@dataclass
class EvalResult:
    identity: str
    base: str
    photos: list[str]
    steps: int
    per_photo: dict[str, list[dict[str, float | None]]]  # model -> one row per photo
    mean: dict[str, dict[str, float | None]]  # model -> metric -> mean
    consistency: dict[str, dict[str, float | None]]  # model -> {"mirror_lpips"/"mirror_rmse", "id_across_yaws"}
    networks: dict[str, bool] = field(default_factory=dict)
    # model -> each photo's inversion (latent, camera, render): for callers that show them; not in to_dict
    inversions: dict[str, list[Any]] = field(default_factory=dict, repr=False)

    def better(self) -> dict[str, bool]:
        """metric -> personalized beats base (only metrics both have)."""
        out = {}
        for key, higher in (("psnr", True), ("ssim", True), ("lpips", False), ("id", True)):
            b, p = self.mean["base"].get(key), self.mean["personalized"].get(key)
            if b is not None and p is not None:
                out[key] = p > b if higher else p < b
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"identity": self.identity, "base": self.base, "photos": self.photos, "steps": self.steps,
                "mean": self.mean, "per_photo": self.per_photo, "consistency": self.consistency,
                "personalized_better": self.better(), "networks": self.networks}

    def table(self) -> str:
        """The human table: one row per metric, base vs personalized."""
        rows = [f"{'metric':<14} {'base':>10} {'personalized':>13}"]
        names = {"psnr": "PSNR dB ↑", "ssim": "SSIM ↑", "lpips": "LPIPS-alex ↓", "id": "ArcFace id ↑"}
        for key, label in names.items():
            b, p = self.mean["base"].get(key), self.mean["personalized"].get(key)
            if b is None and p is None:
                continue
            rows.append(f"{label:<14} {_fmt(b):>10} {_fmt(p):>13}")
        for key in ("mirror_lpips", "mirror_rmse", "id_across_yaws"):
            b, p = self.consistency["base"].get(key), self.consistency["personalized"].get(key)
            if b is not None or p is not None:
                arrow = "↑" if key == "id_across_yaws" else "↓"
                rows.append(f"{key + ' ' + arrow:<14} {_fmt(b):>10} {_fmt(p):>13}")
        return "\n".join(rows)


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.4f}" if abs(v) < 10 else f"{v:.2f}"


def _mean(rows: list[dict[str, float | None]], key: str) -> float | None:
    values = [r[key] for r in rows if r.get(key) is not None]
    return float(sum(values) / len(values)) if values else None


@torch.no_grad()
def score(image: torch.Tensor, target: torch.Tensor, lpips: nn.Module | None, arcface: nn.Module | None
          ) -> dict[str, float | None]:
    """Metrics of one reconstruction [1, 3, H, W] against its photo, both in [-1, 1]."""
    from my3dgen_cli.losses import metrics

    row: dict[str, float | None] = {"psnr": float(metrics.psnr(image, target)[0]),
                                    "ssim": float(metrics.ssim(image, target)[0]), "lpips": None, "id": None}
    if lpips is not None:
        row["lpips"] = float(metrics.lpips_distance(lpips, image, target)[0])
    if arcface is not None:
        from my3dgen_cli.losses.arcface import identity_features

        a, b = identity_features(arcface, image), identity_features(arcface, target)
        row["id"] = float(torch.nn.functional.cosine_similarity(a, b)[0])
    return row


@torch.no_grad()
def consistency(G: nn.Module, ws: torch.Tensor, lpips: nn.Module | None, arcface: nn.Module | None,
                yaws: tuple[float, ...] = CONSISTENCY_YAWS) -> dict[str, float | None]:
    """Mirror consistency (yaw +a vs flipped -a) and identity similarity across yaws of one latent."""
    from my3dgen_cli.eg3d.camera import camera_rig
    from my3dgen_cli.use.render import render_views

    angles = [0.0] + [s * a for a in yaws for s in (1.0, -1.0)]
    # render_views returns host tensors; the loss networks live on G's device
    views = render_views(G, ws, camera_rig(G).lookat(angles, 0.0), batch=len(angles)).images.to(ws.device)
    left, right = views[1::2], views[2::2].flip(-1)
    out: dict[str, float | None] = {"mirror_lpips": None, "mirror_rmse": None, "id_across_yaws": None}
    if lpips is not None:
        out["mirror_lpips"] = float(lpips(left, right).mean())
    else:
        out["mirror_rmse"] = float((left - right).square().mean().sqrt())
    if arcface is not None:
        from my3dgen_cli.losses.arcface import identity_features

        f = identity_features(arcface, views)
        out["id_across_yaws"] = float(torch.nn.functional.cosine_similarity(f[1:], f[:1].expand(len(f) - 1, -1)).mean())
    return out


def evaluate(
    identity: str,
    images: torch.Tensor,
    cameras: torch.Tensor,
    names: list[str],
    steps: int = 100,
    space: str = "w",
    device: torch.device | str | None = None,
    lpips: nn.Module | None = None,
    arcface: nn.Module | None = None,
    on_step: Any = None,
) -> EvalResult:
    """Invert each photo (images [N, 3, H, W] in [-1, 1], cameras [N, 25]) under base and personalized."""
    from my3dgen_cli.generators import open_generator
    from my3dgen_cli.identity import identity_anchors
    from my3dgen_cli.personalize.anchors import resize
    from my3dgen_cli.use.invert import InvertConfig, invert_images

    G, ref, _ = open_generator(identity=identity, device=device)
    from my3dgen_cli.generators import open_base

    B, _ = open_base(str(ref.path), device=device)
    for p in B.parameters():
        p.requires_grad_(False)
    B.eval()
    dev = next(G.parameters()).device
    anchors, _ = identity_anchors(identity, dev)
    targets = resize(images.float(), G.img_resolution).to(dev)
    cameras = cameras.float().to(dev)
    lpips = lpips.to(dev) if lpips is not None else None
    arcface = arcface.to(dev) if arcface is not None else None
    cfg = InvertConfig(steps=steps, space=space, lpips_weight=1.0 if lpips is not None else 0.0)
    per_photo: dict[str, list[dict[str, float | None]]] = {m: [] for m in MODELS}
    inversions: dict[str, list[Any]] = {m: [] for m in MODELS}
    for model_name, model in zip(MODELS, (B, G), strict=True):
        for start in range(0, targets.shape[0], INVERT_BATCH):
            part = slice(start, start + INVERT_BATCH)
            for i, res in enumerate(invert_images(model, targets[part], cameras[part], anchors=anchors, config=cfg,
                                                  perceptual=lpips), start):
                per_photo[model_name].append(score(res.image, targets[i:i + 1], lpips, arcface))
                inversions[model_name].append(res)
                if on_step is not None:
                    on_step(model_name, i)
    mean = {m: {k: _mean(per_photo[m], k) for k in ("psnr", "ssim", "lpips", "id")} for m in MODELS}
    cons = {m: consistency(model, inversions[m][0].ws, lpips, arcface) for m, model in zip(MODELS, (B, G), strict=True)}
    return EvalResult(identity, ref.name, names, steps, per_photo, mean, cons,
                      {"lpips": lpips is not None, "arcface": arcface is not None}, inversions)
