"""GAN inversion: find the latent (and optionally refine the camera) that renders a given crop.

    result = invert_image(G, target, camera, anchors=ws_anchors, config=InvertConfig(steps=300))
    result.ws        # [1, num_ws, w_dim]   result.camera  # [1, 25]   result.psnr, result.lpips

The search starts from an identity's anchors (their mean, or the one nearest the target) or, on a
bare base, from the mapping network's `w_avg`. Spaces:
- "w":  one w vector [1, 1, w_dim] broadcast to every synthesis layer (closest to the prior);
- "w+": one vector per layer [1, num_ws, w_dim] (more expressive, used by PTI and My3DGen tests);
- hull: the latent is a softmax-weighted mix of the anchors (MyStyle's "stay in the personalized
  space"); only the mixing logits are optimized, per layer in w+.
Loss: MSE on the final image + MSE on the raw neural render against the target downsampled to its
size (My3DGen's two-resolution loss), + LPIPS on the final image when a perceptual net is given.
Camera refinement optimizes a small yaw/pitch rotation about the camera pivot. `use.pti.tune_adapter`
then (PTI-style) trains only the adapter tensors for this one image, latent and camera fixed.
`run_invert(InvertPlan(...))` is `my3dgen invert`: photos or aligned crops in, .latent files out.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from my3dgen_cli.eg3d import ops
from my3dgen_cli.eg3d.camera import FFHQ_PIVOT, camera_rig, check_label
from my3dgen_cli.errors import UserInputError
from my3dgen_cli.optim import Adam
from my3dgen_cli.output import Output
from my3dgen_cli.speed import summed_gradients
from my3dgen_cli.use.sources import ModelChoice

SPACES = ("w", "w+")
INITS = ("mean", "nearest")


@dataclass(frozen=True)
class InvertConfig:
    """Optimization settings (validated on creation). lr is Adam's step on the latent."""

    steps: int = 300
    space: str = "w+"
    lr: float = 0.02
    init: str = "mean"
    hull: bool = False
    hull_lr: float = 0.1
    refine_camera: bool = False
    camera_lr: float = 0.5  # degrees per step (Adam)
    image_weight: float = 1.0
    raw_weight: float = 1.0
    lpips_weight: float = 1.0
    lpips_size: int = 256  # LPIPS on at most this many pixels (official projectors use 256)

    def __post_init__(self) -> None:
        if self.steps < 0:
            raise ValueError(f"steps: got {self.steps}, expected 0 or more")
        if self.space not in SPACES:
            raise ValueError(f"space: got {self.space!r}, expected one of {SPACES}")
        if self.init not in INITS:
            raise ValueError(f"init: got {self.init!r}, expected one of {INITS}")
        for name in ("lr", "hull_lr", "camera_lr"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}: got {getattr(self, name)}, expected > 0")


@dataclass
class InvertResult:
    ws: torch.Tensor  # [1, num_ws, w_dim], detached
    camera: torch.Tensor  # [1, 25]
    image: torch.Tensor  # [1, 3, H, W] final render in [-1, 1]
    psnr: float  # dB, images mapped to [0, 1]
    lpips: float | None
    losses: list[float] = field(default_factory=list)
    init_anchor: int | None = None  # index of the starting anchor ("nearest"), else None
    hull_weights: torch.Tensor | None = None  # [rows, K] softmax weights in hull mode
    camera_delta: tuple[float, float] = (0.0, 0.0)  # (yaw, pitch) degrees added by refinement


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean PSNR in dB of [N, 3, H, W] images in [-1, 1] (metrics.psnr: mapped and clipped to [0, 1])."""
    from my3dgen_cli.losses.metrics import psnr as psnr_per_image

    return float(psnr_per_image(a.detach(), b.detach()).mean())


def lpips_distance(net: nn.Module | None, a: torch.Tensor, b: torch.Tensor, size: int = 256) -> torch.Tensor | None:
    """Mean LPIPS of [N,3,H,W] images in [-1, 1], or None without a net."""
    if net is None:
        return None
    from my3dgen_cli.personalize.anchors import resize

    if a.shape[-1] > size:  # LPIPS at <= `size` px, as the anchor projection does
        a, b = resize(a, size), resize(b, size)
    return net(a, b).mean()


def rotate_camera(camera: torch.Tensor, yaw: torch.Tensor, pitch: torch.Tensor,
                  pivot: tuple[float, float, float] = FFHQ_PIVOT) -> torch.Tensor:
    """Turn cameras [N, 25] about the pivot by yaw (about world +y) and pitch (about world x), degrees.

    Differentiable in yaw and pitch (0-d tensors). Positive yaw moves the camera towards +x and
    positive pitch moves it up, as in camera.py; for a LookAt camera, small turns match a change of
    its yaw/pitch angles to first order.
    """
    check_label(camera)
    a, b = -torch.deg2rad(yaw.float()), torch.deg2rad(pitch.float())
    zero, one = torch.zeros_like(a), torch.ones_like(a)
    # The camera of a LookAt pose sits at -z looking along +z; yaw +a swings it towards +x.
    ry = torch.stack([torch.stack([torch.cos(a), zero, -torch.sin(a)]),
                      torch.stack([zero, one, zero]),
                      torch.stack([torch.sin(a), zero, torch.cos(a)])])
    # pitch +b lifts it towards -y (world up is -y in the OpenCV camera, +y in the world of camera.py).
    rx = torch.stack([torch.stack([one, zero, zero]),
                      torch.stack([zero, torch.cos(b), torch.sin(b)]),
                      torch.stack([zero, -torch.sin(b), torch.cos(b)])])
    rot = ry @ rx  # [3, 3]
    c2w = camera[:, :16].reshape(-1, 4, 4).float()
    p = torch.tensor(pivot, dtype=c2w.dtype, device=c2w.device)
    rotated_r = rot @ c2w[:, :3, :3]
    rotated_t = (rot @ (c2w[:, :3, 3] - p).unsqueeze(-1)).squeeze(-1) + p
    top = torch.cat([rotated_r, rotated_t.unsqueeze(-1)], dim=-1)  # [N, 3, 4]
    bottom = c2w[:, 3:4, :]
    out = torch.cat([top, bottom], dim=1).reshape(-1, 16)
    return torch.cat([out, camera[:, 16:].float()], dim=1)


def render_losses(G: nn.Module, ws: torch.Tensor, camera: torch.Tensor, target: torch.Tensor,
            net: nn.Module | None, cfg: InvertConfig) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    out = G.synthesis(ws, camera, noise_mode="const", sampling="deterministic")
    image = out["image"]
    raw = out["image_raw"]
    target_raw = F.interpolate(target, size=raw.shape[-2:], mode="area")
    loss = cfg.image_weight * F.mse_loss(image, target) + cfg.raw_weight * F.mse_loss(raw, target_raw)
    lp = lpips_distance(net, image, target, cfg.lpips_size)
    if lp is not None:
        loss = loss + cfg.lpips_weight * lp
    return loss, out


@torch.no_grad()
def nearest_anchor(G: nn.Module, anchors: torch.Tensor, target: torch.Tensor, camera: torch.Tensor,
                   net: nn.Module | None = None, size: int = 256) -> int:
    """Index of the anchor whose render from `camera` is closest to `target` (LPIPS, else MSE)."""
    best, best_d = 0, float("inf")
    for k in range(anchors.shape[0]):
        image = G.synthesis(anchors[k:k + 1], camera, noise_mode="const", sampling="deterministic")["image"]
        d = lpips_distance(net, image, target, size)
        d = float(F.mse_loss(image, target) if d is None else d)
        if d < best_d:
            best, best_d = k, d
    return best


def start_latent(G: nn.Module, anchors: torch.Tensor | None) -> torch.Tensor:
    """[1, num_ws, w_dim] starting point: mean of the anchors, else the mapping network's w_avg."""
    if anchors is not None and anchors.shape[0] > 0:
        return anchors.mean(0, keepdim=True)
    w_avg = G.backbone.mapping.w_avg.detach()
    return w_avg.reshape(1, 1, -1).expand(1, G.num_ws, -1).clone()


def invert_image(
    G: nn.Module,
    target: torch.Tensor,
    camera: torch.Tensor,
    anchors: torch.Tensor | None = None,
    config: InvertConfig | None = None,
    perceptual: nn.Module | None = None,
    on_step: Callable[[int, float], None] | None = None,
) -> InvertResult:
    """Optimize a latent so that G renders `target` from `camera`.

    G: a frozen generator (base + adapter). target: [1, 3, H, W] in [-1, 1] at G's image size.
    camera: [1, 25]. anchors: [K, num_ws, w_dim] on G's device, or None (start from w_avg).
    perceptual: an LPIPS module or None (pixel losses only). on_step(step, loss) after each step.
    """
    ops.check_shape("target", target, [1, 3, G.img_resolution, G.img_resolution])
    return invert_images(G, target, camera, anchors, config, perceptual, on_step)[0]


def invert_images(
    G: nn.Module,
    targets: torch.Tensor,
    cameras: torch.Tensor,
    anchors: torch.Tensor | None = None,
    config: InvertConfig | None = None,
    perceptual: nn.Module | None = None,
    on_step: Callable[[int, float], None] | None = None,
) -> list[InvertResult]:
    """`invert_image` of each of targets [N, 3, H, W] from cameras [N, 25], as one batch.

    Each photo has its own latent and the loss is the sum of the photos' losses, so every latent
    gets the gradient of its own inversion and Adam (element-wise) moves it as it would alone: the
    same results up to float rounding, in one render per step instead of N (on a CPU a batch-1 render
    leaves a second core mostly idle; `my3dgen eval` and the demo batch their photos). Hull and camera
    refinement optimize per-photo shapes: those invert one photo at a time.
    on_step(step, loss) gets the mean loss per photo.
    """
    cfg = config or InvertConfig()
    res = G.img_resolution
    ops.check_shape("targets", targets, [None, 3, res, res])
    n = targets.shape[0]
    check_label(cameras)
    if cameras.shape[0] != n:
        raise ValueError(f"cameras: got {cameras.shape[0]}, expected one per target ({n})")
    if cfg.hull and (anchors is None or anchors.shape[0] < 2):
        got = 0 if anchors is None else anchors.shape[0]
        raise ValueError(f"hull inversion: got {got} anchors, expected 2 or more")
    if n > 1 and (cfg.hull or cfg.refine_camera):
        return [invert_images(G, targets[i:i + 1], cameras[i:i + 1], anchors, cfg, perceptual, on_step)[0]
                for i in range(n)]
    targets = targets.detach().float()
    cameras = cameras.detach().float()
    init_anchors: list[int | None] = [None] * n
    if cfg.init == "nearest" and anchors is not None and anchors.shape[0] > 0:
        init_anchors = [nearest_anchor(G, anchors, targets[i:i + 1], cameras[i:i + 1], perceptual, cfg.lpips_size)
                        for i in range(n)]
        ws0 = anchors[init_anchors].detach().clone()
    else:
        ws0 = start_latent(G, anchors).expand(n, -1, -1)

    unknowns = _Unknowns(G, cfg, ws0, anchors, cameras, init_anchors[0])
    # The mean losses times n: the sum over photos (each has the same number of pixels); n = 1 is exact.
    def part_loss(lo: int, hi: int) -> torch.Tensor:  # photos lo:hi's share of the sum
        ws, cams = unknowns.ws()[lo:hi], unknowns.camera()[lo:hi]
        return render_losses(G, ws, cams, targets[lo:hi], perceptual, cfg)[0] * (hi - lo)

    leaves = [p for group in unknowns.groups for p in group["params"]]
    losses = _optimize(unknowns.groups, cfg.steps, None if on_step is None else lambda s, v: on_step(s, v / n),
                       lambda: summed_gradients(part_loss, n, leaves, targets.device))
    losses = [v / n for v in losses]
    with torch.no_grad():
        ws, cams = unknowns.ws().detach().clone(), unknowns.camera().detach().clone()
        images = G.synthesis(ws, cams, noise_mode="const", sampling="deterministic")["image"]
        results = []
        for i in range(n):
            one = slice(i, i + 1)
            lp = lpips_distance(perceptual, images[one], targets[one], cfg.lpips_size)
            results.append(InvertResult(
                ws=ws[one].clone(), camera=cams[one].clone(), image=images[one].clone(),
                psnr=psnr(images[one], targets[one]),
                lpips=None if lp is None else float(lp), losses=losses, init_anchor=init_anchors[i],
                hull_weights=torch.softmax(unknowns.logits, -1).detach() if cfg.hull else None,
                camera_delta=tuple(unknowns.angles.detach().tolist()),
            ))
    return results


class _Unknowns:
    """What an inversion optimizes: a w / w+ latent (or, with hull, one logit per anchor and row) and,
    with refine_camera, a yaw/pitch correction about the base's pivot; `groups` are Adam's parameter groups."""

    def __init__(self, G: nn.Module, cfg: InvertConfig, ws0: torch.Tensor, anchors: torch.Tensor | None,
                 camera: torch.Tensor, init_anchor: int | None) -> None:
        self.num_ws, self.cfg, self.base_camera = G.num_ws, cfg, camera
        self.rows = 1 if cfg.space == "w" else G.num_ws
        self.groups: list[dict] = []
        device = camera.device
        if cfg.hull:
            # One logit per anchor (and per layer in w+); the nearest anchor, if chosen, starts heavier.
            self.logits = torch.zeros(self.rows, anchors.shape[0], device=device)
            if init_anchor is not None:
                self.logits[:, init_anchor] = 2.0
            self.logits.requires_grad_(True)
            self.groups.append({"params": [self.logits], "lr": cfg.hull_lr})
            basis = anchors.detach().float()  # [K, num_ws, w_dim]
            self.basis = basis.mean(1, keepdim=True) if cfg.space == "w" else basis  # [K, rows, w_dim]
        else:
            self.w = (ws0.mean(1, keepdim=True) if cfg.space == "w" else ws0).detach().clone().float()
            self.w.requires_grad_(True)
            self.groups.append({"params": [self.w], "lr": cfg.lr})
        self.angles = torch.zeros(2, device=device, requires_grad=cfg.refine_camera)
        if cfg.refine_camera:
            self.groups.append({"params": [self.angles], "lr": cfg.camera_lr})
        self.pivot = camera_rig(G).pivot  # turns go about the base's own pivot

    def ws(self) -> torch.Tensor:
        if self.cfg.hull:
            weights = torch.softmax(self.logits, dim=-1)  # [rows, K]
            basis = self.basis.expand(-1, self.rows, -1) if self.rows > 1 else self.basis
            return torch.einsum("rk,krd->rd", weights, basis).unsqueeze(0).expand(1, self.num_ws, -1)
        return self.w.expand(-1, self.num_ws, -1)

    def camera(self) -> torch.Tensor:
        if self.cfg.refine_camera:
            return rotate_camera(self.base_camera, self.angles[0], self.angles[1], self.pivot)
        return self.base_camera


def _optimize(groups: list[dict], steps: int, on_step: Callable[[int, float], None] | None,
              loss_fn: Callable[[], torch.Tensor]) -> list[float]:
    """Adam over `groups` for `steps` steps, the learning rates on a cosine decay; the loss of each step.

    loss_fn() returns a step's loss with its gradient already in the parameters' .grad (speed.summed_gradients).
    """
    losses: list[float] = []
    if steps <= 0:
        return losses
    opt = Adam(groups, betas=(0.9, 0.999))
    base_lrs = [group["lr"] for group in groups]
    for step in range(steps):
        # Cosine decay over the last three quarters keeps the end of the run from dithering.
        t = step / max(steps - 1, 1)
        scale = 1.0 if t < 0.25 else 0.5 * (1 + math.cos(math.pi * (t - 0.25) / 0.75))
        for group, base_lr in zip(opt.param_groups, base_lrs, strict=True):
            group["lr"] = base_lr * max(scale, 0.05)
        opt.zero_grad(set_to_none=True)
        loss = loss_fn()  # and its gradient
        opt.step()
        losses.append(float(loss.detach()))
        if on_step is not None:
            on_step(step, losses[-1])
    return losses


@dataclass(frozen=True)
class InvertPlan:
    """What `my3dgen invert` was asked for: the photos, the optimization, PTI tuning, where the files go.

    Cameras: --yaw/--pitch for aligned crops (on the base's camera rig), `labels` (a dataset.json
    listing the crops), else faces are detected and cropped. `out`: a folder (default .) or one
    .latent for one image; beside each latent its preview and, with `tune`, the tuned adapter.
    """

    model: ModelChoice
    images: tuple[Path, ...]
    config: InvertConfig = field(default_factory=InvertConfig)
    tune: int = 0
    tune_rank: int = 1
    yaw: float | None = None
    pitch: float | None = None
    labels: Path | None = None
    use_lpips: bool = True
    out: Path | None = None
    force: bool = False

    def outputs(self) -> list[list[tuple[str, Path]]]:
        """Per image: (kind, path) of its latent, preview and tuned adapter; UserInputError for a bad request."""
        if self.labels is not None and (self.yaw is not None or self.pitch is not None):
            raise UserInputError("give either --yaw/--pitch or --labels, not both")
        from my3dgen_cli.use.sources import check_images

        check_images(self.images)
        stems = [p.stem for p in self.images]
        if len(set(stems)) != len(stems):
            raise UserInputError("two images share a file stem; outputs are named after it")
        single = self.out is not None and self.out.suffix == ".latent"
        if self.out is not None and not single and self.out.suffix and not self.out.is_dir():
            raise UserInputError(f"-o {self.out}: got suffix {self.out.suffix!r}, expected a .latent file or a folder")
        if single and len(self.images) > 1:
            raise UserInputError(f"-o {self.out}: one .latent file for {len(self.images)} images; give a folder")
        folder = (self.out.parent if single else self.out) if self.out is not None else Path(".")
        plan = []
        for stem in stems:
            lat = self.out if single else folder / f"{stem}.latent"
            row = [("latent", lat), ("preview", lat.with_suffix(".preview.png"))]
            if self.tune:
                row.append(("tuned adapter", lat.with_suffix(".adapter.safetensors")))
            plan.append(row)
        return plan


@dataclass
class InvertRun:
    base: str
    identity: str | None
    space: str
    results: list[dict[str, Any]]  # per image: PSNR, LPIPS, camera change, tuned scores, files
    outputs: list[tuple[str, Path]]  # (kind, path) of every file written

    def to_dict(self) -> dict[str, Any]:
        return {"base": self.base, "identity": self.identity, "space": self.space, "results": self.results}


def run_invert(plan: InvertPlan, output: Output | None = None) -> InvertRun:
    """Invert every image of `plan` and write its files (all checked free before the model opens)."""
    from my3dgen_cli.fileio import check_free
    from my3dgen_cli.identity import identity_anchors
    from my3dgen_cli.use.sources import photo_targets

    files = plan.outputs()
    check_free([p for row in files for _, p in row], plan.force)
    G, ref, dev = plan.model.open()
    # bad images fail before any loss setup; --yaw/--pitch cameras sit on the base's rig
    targets = photo_targets(plan.images, G.img_resolution, camera_rig(G), plan.yaw, plan.pitch, plan.labels)
    anchors, _ = identity_anchors(plan.model.identity, dev)
    if plan.config.hull and anchors is None:
        raise UserInputError("--hull needs an identity with anchors (--identity NAME)")
    out = output or Output("quiet")
    net = None
    if plan.use_lpips:
        from my3dgen_cli.losses.perceptual import offline_fallback, perceptual_loss

        net = perceptual_loss("vgg", offline=plan.model.offline, required=False, output=out)
        if net is None:
            out.warn(offline_fallback(["lpips-vgg16"], "using pixel losses only (--no-lpips to ask for that)"))
        else:
            net = net.to(dev)
    original = None
    if plan.tune:
        from my3dgen_cli.lora import get_adapter_state

        original = get_adapter_state(G)  # the identity's adapter, restored after each image
    results = []
    with out.progress() as bar:
        for (stem, target, cam), row in zip(targets, files, strict=True):
            task = bar.add_task(stem, total=plan.config.steps + plan.tune, status="")

            def step(s: int, loss: float, what: str = "loss", task: Any = task) -> None:
                bar.update(task, advance=1, status=f"{what} {loss:.4f}")

            results.append(_invert_one(plan, G, ref, stem, target.to(dev), cam.to(dev), row, anchors, net, original,
                                       step))
    return InvertRun(ref.name, plan.model.identity, plan.config.space, results, [p for row in files for p in row])


def _invert_one(plan: InvertPlan, G: nn.Module, ref: Any, stem: str, target: torch.Tensor, cam: torch.Tensor,
                row: list[tuple[str, Path]], anchors: torch.Tensor | None, net: nn.Module | None,
                original: dict[str, torch.Tensor] | None, step: Callable[..., None]) -> dict[str, Any]:
    """Invert one image (and PTI-tune when asked); write its latent, preview and tuned adapter."""
    from my3dgen_cli import media
    from my3dgen_cli.identity import Latent, write_latent

    cfg = plan.config
    res = invert_image(G, target, cam, anchors, cfg, net, on_step=step)
    entry: dict[str, Any] = {"image": stem, "psnr": round(res.psnr, 3),
                             "lpips": None if res.lpips is None else round(res.lpips, 4),
                             "camera_delta_deg": res.camera_delta, "init_anchor": res.init_anchor}
    preview = [media.to_uint8(target), media.to_uint8(res.image)]
    extra: dict[str, Any] = {"source": str(row[0][1].name), "psnr": res.psnr, "lpips": res.lpips,
                             "steps": cfg.steps, "hull": cfg.hull}
    if plan.tune:
        from my3dgen_cli.adapter_file import save_adapter
        from my3dgen_cli.lora import add_adapters
        from my3dgen_cli.use.pti import restore_adapter, tune_adapter

        if not original:  # a bare base: a fresh adapter (B = 0, so tuning starts from the base exactly)
            add_adapters(G, rank=plan.tune_rank)
        psnr_t, lpips_t, tuned = tune_adapter(G, res.ws, res.camera, target, plan.tune, perceptual=net, config=cfg,
                                              on_step=lambda s, loss: step(s, loss, "tune"))
        save_adapter(G, row[2][1], base_name=ref.name, base_sha256=ref.sha256,
                     extra={"pti_for": stem, "tuned_from": plan.model.identity or "base"})
        extra["adapter"] = row[2][1].name
        preview.append(media.to_uint8(tuned))
        entry.update(tuned_psnr=round(psnr_t, 3), tuned_lpips=None if lpips_t is None else round(lpips_t, 4))
        restore_adapter(G, original or {})
    write_latent(row[0][1], Latent(res.ws, res.camera, base=ref.name, identity=plan.model.identity, space=cfg.space,
                                   extra=extra))
    media.write_png(row[1][1], media.grid(preview))
    entry["files"] = {k: str(p) for k, p in row}
    return entry
