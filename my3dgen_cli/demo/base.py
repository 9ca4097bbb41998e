"""The demo's base generator: the tiny EG3D fitted to a family of simple 3-D heads (not a face model).

A randomly initialized tiny EG3D renders flat colour, useless for showing what personalization
does. So the demo first *fits* the tiny generator (all of it: mapping, backbone, decoder,
superresolution) to an analytic scene family, in a minute or two of CPU, from a fixed seed:

    head      ellipsoid, semi-axes ~(0.21, 0.27, 0.24) scene units, centred at the origin, facing +z
    nose      a sphere on the front surface
    colours   skin everywhere, hair over the top and back, dark eyes in white rings, a red mouth
    z         the first six entries of z set skin tone, hair colour, width, height and hairline

Stage 1 supervises the tri-plane decoder's density and colour at 3-D points (so the geometry is
real 3-D and the same from every view); stage 2 trains the superresolution on renders from many
yaws and pitches, with targets composited by the project's own `renderer.march` from the
analytic field. The "person" of the demo is a low-rank (LoRA) change of this base fitted the same
way to a head with other colours and shape (`fit_person`).

    G = build_demo_base(seed=0)                 # deterministic for a seed and step counts
    params = head_params(z)                     # HeadParams of a batch of z [N, z_dim]
    images = render_heads(params, cameras, 64)  # analytic ground truth, [N, 3, 64, 64] in [-1, 1]
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from my3dgen_cli.eg3d.renderer import march, ray_bundle, sample_from_planes
from my3dgen_cli.optim import Adam

# The recipe's version is part of the cached base's name: a base built by an older recipe is not reused.
RECIPE = 2
SIGMA_INSIDE = 40.0  # raw sigma inside the head (density softplus(sigma - 1) per scene unit)
SIGMA_OUTSIDE = -6.0
EDGE = 0.012  # scene units over which density and colours change
HEAD_AXES = (0.21, 0.27, 0.24)
# Ground-truth rays are sampled only where a head can be (camera radius 2.7, head radius < 0.35).
TRUTH_RANGE = (2.3, 3.1)


@dataclass(frozen=True)
class HeadParams:
    """One analytic head per row: colours in [0, 1], lengths in scene units."""

    skin: torch.Tensor  # [N, 3]
    hair: torch.Tensor  # [N, 3]
    axes: torch.Tensor  # [N, 3] semi-axes x, y, z
    nose: torch.Tensor  # [N] nose radius
    hairline: torch.Tensor  # [N] normalized height of the hairline at the front
    mouth: torch.Tensor  # [N, 3]

    def __len__(self) -> int:
        return self.skin.shape[0]


def _lerp3(a: tuple[float, ...], b: tuple[float, ...], t: torch.Tensor) -> torch.Tensor:
    """[N] weights -> [N, 3] colours between a and b."""
    a_t, b_t = torch.tensor(a, device=t.device), torch.tensor(b, device=t.device)
    return a_t + (b_t - a_t) * t[:, None]


def head_params(z: torch.Tensor) -> HeadParams:
    """The analytic head of each z [N, z_dim] (z_dim >= 6): a smooth function of z[:, :6]."""
    if z.ndim != 2 or z.shape[1] < 6:
        raise ValueError(f"z: got shape {tuple(z.shape)}, expected [N, >= 6]")
    t = torch.sigmoid(z[:, :6].float() * 1.2)
    skin = torch.where(t[:, :1] < 0.5, _lerp3((0.98, 0.84, 0.72), (0.80, 0.58, 0.42), 2 * t[:, 0]),
                       _lerp3((0.80, 0.58, 0.42), (0.42, 0.27, 0.18), 2 * t[:, 0] - 1))
    hair = _lerp3((0.10, 0.07, 0.05), (0.85, 0.68, 0.38), t[:, 1])
    hair = hair + (torch.tensor([0.25, -0.05, -0.10], device=z.device) * (t[:, 2:3] - 0.5))
    axes = torch.tensor(HEAD_AXES, device=z.device) * torch.stack(
        [1 + 0.16 * (t[:, 3] - 0.5), 1 + 0.12 * (t[:, 4] - 0.5), torch.ones_like(t[:, 0])], dim=1)
    nose = torch.full_like(t[:, 0], 0.045)
    hairline = 0.25 + 0.3 * t[:, 5]
    mouth = _lerp3((0.70, 0.20, 0.20), (0.70, 0.20, 0.20), t[:, 0])
    return HeadParams(skin, hair.clamp(0, 1), axes, nose, hairline, mouth)


def person_params(z: torch.Tensor) -> HeadParams:
    """The demo's hidden person: the head of `z`, wider, with a big nose, red hair and a blue mouth."""
    p = head_params(z)
    n = len(p)
    return replace(p, hair=torch.tensor([[0.80, 0.22, 0.06]], device=z.device).expand(n, 3),
                   skin=torch.tensor([[0.93, 0.74, 0.62]], device=z.device).expand(n, 3),
                   axes=p.axes * torch.tensor([1.18, 0.95, 1.0], device=z.device),
                   nose=p.nose * 1.5, hairline=torch.full_like(p.hairline, 0.1),
                   mouth=torch.tensor([[0.15, 0.25, 0.75]], device=z.device).expand(n, 3))


HEAD_FIELDS = ("skin", "hair", "axes", "nose", "hairline", "mouth")


def _select(p: HeadParams, index: torch.Tensor) -> HeadParams:
    return HeadParams(*(getattr(p, f)[index] for f in HEAD_FIELDS))


def head_field(points: torch.Tensor, p: HeadParams) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw sigma [N, M, 1] and colour [N, M, 3] in [0, 1] at world points [N, M, 3] of head N.

    World axes as in camera.py: +y up, the face looks along +z.
    """
    axes = p.axes[:, None, :]  # [N, 1, 3]
    u = points / axes  # normalized coordinates
    radius = u.norm(dim=-1, keepdim=True)
    d_head = (radius - 1) * axes.min(-1, keepdim=True).values  # approximate signed distance
    nose_centre = torch.stack([torch.zeros_like(p.nose), -0.12 * p.axes[:, 1], 0.96 * p.axes[:, 2]], 1)[:, None]
    d_nose = (points - nose_centre).norm(dim=-1, keepdim=True) - p.nose[:, None, None]
    d = torch.minimum(d_head, d_nose)
    sigma = SIGMA_OUTSIDE + (SIGMA_INSIDE - SIGMA_OUTSIDE) * torch.sigmoid(-d / EDGE)

    ux, uy, uz = u[..., 0:1], u[..., 1:2], u[..., 2:3]
    front = torch.sigmoid((uz - 0.2) / 0.05)
    # hair: above the hairline at the front, dropping to the nape at the back
    hair = torch.sigmoid((uy - p.hairline[:, None, None] + 1.3 * F.relu(-uz + 0.1)) / 0.06)
    hair = hair * (1 - torch.sigmoid((d_nose) / -EDGE))  # never on the nose
    colour = p.skin[:, None] + (p.hair[:, None] - p.skin[:, None]) * hair
    for side in (-1.0, 1.0):
        r_eye = ((ux - side * 0.38) ** 2 + ((uy - 0.08) / 0.8) ** 2).sqrt()
        white = torch.sigmoid((0.22 - r_eye) / 0.025) * front
        pupil = torch.sigmoid((0.12 - r_eye) / 0.02) * front
        colour = colour + (0.97 - colour) * white
        colour = colour + (torch.tensor([0.08, 0.06, 0.05], device=points.device) - colour) * pupil
    mouth = torch.sigmoid((0.33 - ux.abs()) / 0.03) * torch.sigmoid((0.07 - (uy + 0.5).abs()) / 0.02) * front
    colour = colour + (p.mouth[:, None] - colour) * mouth
    return sigma, colour.clamp(0, 1)


@torch.no_grad()
def render_heads(p: HeadParams, cameras: torch.Tensor, resolution: int, samples: int = 48) -> torch.Tensor:
    """Analytic heads seen from cameras [N, 25]: [N, 3, R, R] in [-1, 1], composited by `renderer.march`."""
    n = cameras.shape[0]
    origins, dirs = ray_bundle(cameras[:, :16].reshape(-1, 4, 4), cameras[:, 16:].reshape(-1, 3, 3), resolution)
    m = origins.shape[1]
    depths = torch.linspace(*TRUTH_RANGE, samples, device=cameras.device).reshape(1, 1, samples, 1).expand(n, m, -1, -1)
    pts = (origins.unsqueeze(-2) + depths * dirs.unsqueeze(-2)).reshape(n, m * samples, 3)
    sigma, colour = head_field(pts, p)
    rgb, _, _ = march(colour.reshape(n, m, samples, 3), sigma.reshape(n, m, samples, 1), depths)
    # march composites onto black (-1); the generator learns the same background.
    return rgb.permute(0, 2, 1).reshape(n, 3, resolution, resolution)


def random_cameras(n: int, gen: torch.Generator, yaw: float = 70.0, pitch: float = 25.0) -> torch.Tensor:
    from my3dgen_cli.eg3d.camera import lookat_camera

    yaws = (torch.rand(n, generator=gen) * 2 - 1) * yaw
    pitches = (torch.rand(n, generator=gen) * 2 - 1) * pitch
    return lookat_camera(yaws, pitches)


def _points(p: HeadParams, n_points: int, gen: torch.Generator, ray_range: tuple[float, float]) -> torch.Tensor:
    """[N, M, 3]: a quarter on camera rays within the renderer's depth range, the rest near the surface.

    The empty-space points lie where rendered rays go (not in a box around the head): out there,
    beyond the tri-plane box along one axis, a point still gets the head's features from the
    other planes, and an unsupervised decoder gives it density that shows up as ghost heads at
    the image edges.
    """
    n, n_far = len(p), n_points // 4
    cams = random_cameras(n, gen)
    origins, dirs = ray_bundle(cams[:, :16].reshape(-1, 4, 4), cams[:, 16:].reshape(-1, 3, 3), 32)
    ray = torch.randint(0, origins.shape[1], (n, n_far, 1), generator=gen).expand(-1, -1, 3)
    depth = ray_range[0] + (ray_range[1] - ray_range[0]) * torch.rand(n, n_far, 1, generator=gen)
    far = origins.gather(1, ray) + depth * dirs.gather(1, ray)
    direction = F.normalize(torch.randn(n, n_points - n_far, 3, generator=gen), dim=-1)
    surface = direction * p.axes[:, None, :] + 0.025 * torch.randn(direction.shape, generator=gen)
    return torch.cat([far, surface], dim=1)


def _field_loss(G: nn.Module, ws: torch.Tensor, p: HeadParams, gen: torch.Generator, n_points: int) -> torch.Tensor:
    """Density and colour of the decoder at random points vs the analytic field."""
    options = G.rendering_kwargs
    pts = _points(p, n_points, gen, (float(options["ray_start"]), float(options["ray_end"])))
    sigma_t, colour_t = head_field(pts, p)
    planes = G.planes(ws, noise_mode="const")
    out = G.decoder(sample_from_planes(planes, pts, float(G.rendering_kwargs["box_warp"])))
    weight = torch.sigmoid(sigma_t / 4)  # colour matters where there is matter
    colour_loss = ((out["rgb"][..., :3] - colour_t) ** 2 * (0.2 + weight)).mean()
    # In raw sigma units (L1 beyond 10): weighted as a tenth of that, the density was drowned by the
    # colour term and stayed flat for ~300 steps (a --fast base never got past it and was fog).
    sigma_loss = F.smooth_l1_loss(out["sigma"], sigma_t, beta=10.0)
    # Raw sigma -1 (density 0.3 per unit) is a small error above but visible fog in a render: in
    # empty space also penalize the density itself, which fades once it no longer shows.
    fog = (F.softplus(out["sigma"] - 1) * (sigma_t < 0)).mean()
    return sigma_loss + 10 * fog + 20 * colour_loss


def _sr_loss(G: nn.Module, ws: torch.Tensor, p: HeadParams, cams: torch.Tensor) -> torch.Tensor:
    """Final image vs the analytic render; the neural render is computed without gradients."""
    with torch.no_grad():
        raw = G.synthesis(ws, cams, noise_mode="const", sampling="deterministic", fused_modconv=False)["image_features"]
        target = render_heads(p, cams, G.img_resolution)
    image = G.superresolution(raw[:, :3], raw, ws, noise_mode="const", fused_modconv=False)
    return F.mse_loss(image, target)


def base_name(fast: bool) -> str:
    """The name of this recipe's base (`demo-tiny-v2`; `demo-tiny-v2-fast` with FitConfig.fast())."""
    return f"demo-tiny-v{RECIPE}" + ("-fast" if fast else "")


# The full recipe's base and person ship inside the wheel (my3dgen_cli/demo_assets/, zoo entries
# with sha256); `my3dgen demo --rebuild-base` fits them again as local bases named by rebuilt_name.
SHIPPED_BASE = base_name(fast=False)
SHIPPED_PERSON = f"{SHIPPED_BASE}-person"


def rebuilt_name(fast: bool) -> str:
    """The local base `--rebuild-base` caches (never the shipped name, so nothing shadows the zoo entry)."""
    return f"{base_name(fast)}-rebuilt"


@torch.no_grad()
def fidelity_psnr(G: nn.Module, seed: int = 1234, latents: int = 2) -> float:
    """PSNR (dB) of the base's renders vs the analytic heads: `latents` z never seen in fitting
    (their own seed) at 5 yaws, pitch 0. How well the base learned the family; used to check a
    rebuilt base against the shipped one."""
    from my3dgen_cli.eg3d.camera import frontal_camera, lookat_camera
    from my3dgen_cli.losses.metrics import psnr

    z = torch.randn(latents, G.z_dim, generator=torch.Generator().manual_seed(seed))
    yaws = [-50.0, -25.0, 0.0, 25.0, 50.0]
    which = torch.arange(latents).repeat_interleave(len(yaws))
    cams = lookat_camera(yaws * latents, [0.0] * len(which))
    image = G.eval().synthesis(G.mapping(z, frontal_camera(latents))[which], cams, noise_mode="const")["image"]
    return float(psnr(image, render_heads(_select(head_params(z), which), cams, G.img_resolution)).mean())


@dataclass(frozen=True)
class FitConfig:
    """Step counts of the fit (the demo's --fast uses `FitConfig.fast()`)."""

    field_steps: int = 700
    sr_steps: int = 150
    batch: int = 6
    points: int = 3072
    lr: float = 0.004
    person_field_steps: int = 300
    person_sr_steps: int = 60
    person_rank: int = 2

    @classmethod
    def fast(cls) -> FitConfig:
        return cls(field_steps=300, sr_steps=30, batch=4, points=2048, person_field_steps=80, person_sr_steps=15)


def _train(params: list[torch.Tensor], steps: int, lr: float, loss_fn: Callable[[int], torch.Tensor],
           on_step: Callable[[str, int, float], None] | None, stage: str) -> None:
    opt = Adam(params, lr=lr, betas=(0.9, 0.99))
    for step in range(steps):
        for group in opt.param_groups:  # cosine decay to 5 %
            group["lr"] = lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * step / max(steps, 1))))
        loss = loss_fn(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if on_step is not None:
            on_step(stage, step, float(loss.detach()))


def build_demo_base(seed: int = 0, config: FitConfig | None = None,
                    on_step: Callable[[str, int, float], None] | None = None) -> nn.Module:
    """The tiny generator fitted to the head family (eval mode, frozen). Deterministic for a seed."""
    from my3dgen_cli.eg3d import build_generator
    from my3dgen_cli.eg3d.camera import frontal_camera

    cfg = config or FitConfig()
    torch.manual_seed(seed)
    G = build_generator("tiny").train()
    gen = torch.Generator().manual_seed(seed)
    cond = frontal_camera(cfg.batch)

    def field_step(_: int) -> torch.Tensor:
        z = torch.randn(cfg.batch, G.z_dim, generator=gen)
        return _field_loss(G, G.mapping(z, cond), head_params(z), gen, cfg.points)

    backbone = [p for n, p in G.named_parameters() if not n.startswith("superresolution.")]
    _train(backbone, cfg.field_steps, cfg.lr, field_step, on_step, "field")

    def sr_step(_: int) -> torch.Tensor:
        z = torch.randn(cfg.batch, G.z_dim, generator=gen)
        with torch.no_grad():
            ws = G.mapping(z, cond)
        return _sr_loss(G, ws, head_params(z), random_cameras(cfg.batch, gen))

    with torch.no_grad():  # start from the upsampled neural render (the image skip), not random colour
        for block in (G.superresolution.block0, G.superresolution.block1):
            block.torgb.weight.zero_()
    _train(list(G.superresolution.parameters()), cfg.sr_steps, cfg.lr, sr_step, on_step, "superresolution")
    with torch.no_grad():  # truncation needs the mean w of this mapping network
        z = torch.randn(1000, G.z_dim, generator=gen)
        G.backbone.mapping.w_avg.copy_(G.mapping(z, frontal_camera(1000)).mean((0, 1)))
    for p in G.parameters():
        p.requires_grad_(False)
    return G.eval()


def person_latent(G: nn.Module, seed: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """(z [1, z_dim], ws [1, num_ws, w_dim]) of the demo person's latent (no truncation)."""
    from my3dgen_cli.eg3d.camera import frontal_camera

    z = torch.randn(1, G.z_dim, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return z, G.mapping(z, frontal_camera(1))


def fit_person(G: nn.Module, z: torch.Tensor, ws: torch.Tensor, seed: int = 0, config: FitConfig | None = None,
               on_step: Callable[[str, int, float], None] | None = None) -> nn.Module:
    """Attach a rank-`person_rank` adapter to G (in place) so that G(ws) renders `person_params(z)`."""
    from my3dgen_cli.lora import add_adapters

    cfg = config or FitConfig()
    gen = torch.Generator().manual_seed(seed + 1)
    G.train()
    params = add_adapters(G, rank=cfg.person_rank, generator=gen)
    target = person_params(z)
    k = cfg.batch

    def field_step(_: int) -> torch.Tensor:
        return _field_loss(G, ws.expand(k, -1, -1), _select(target, torch.zeros(k, dtype=torch.long)), gen,
                           cfg.points)

    def sr_step(_: int) -> torch.Tensor:
        return _sr_loss(G, ws.expand(k, -1, -1), _select(target, torch.zeros(k, dtype=torch.long)),
                        random_cameras(k, gen))

    backbone = [p for n, p in G.named_parameters() if p.requires_grad and not n.startswith("superresolution.")]
    sr = [p for n, p in G.named_parameters() if p.requires_grad and n.startswith("superresolution.")]
    _train(backbone, cfg.person_field_steps, cfg.lr, field_step, on_step, "person")
    _train(sr, cfg.person_sr_steps, cfg.lr, sr_step, on_step, "person superresolution")
    for p in params:
        p.requires_grad_(False)
    return G.eval()
