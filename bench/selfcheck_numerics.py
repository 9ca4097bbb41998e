"""The numeric checks of bench/gpu_selfcheck.py: CUDA parity, torch.compile, render speed, training speed.

Full size = ffhq512-128 with random weights from seed 0 (the shapes and cost of the released model);
--quick uses the tiny config only. Times are best-of-N after a warm-up, synchronized on CUDA.
"""

from __future__ import annotations

import copy
import time

import torch

from bench.personalize_speed import photos_of, time_anchor_step, time_steps
from bench.render_bench import interleaved
from bench.selfcheck_core import (
    LOSS_AMP_ATOL,
    LOSS_EXACT_RTOL,
    MINUTES_LIMIT,
    TOLERANCES,
    Ctx,
    all_finite,
    max_mean_diff,
    peak_mib,
    reset_peak,
    tf32,
)
from my3dgen_cli.eg3d import build_generator
from my3dgen_cli.eg3d.camera import frontal_camera, lookat_camera
from my3dgen_cli.speed import autocast, compiled

FULL = "ffhq512-128"


def seeded_generator(config: str) -> torch.nn.Module:
    """The config with random weights from seed 0, eval mode, on the CPU (the same weights every run)."""
    torch.manual_seed(0)
    return build_generator(config).eval()


def latents(G: torch.nn.Module, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ws [n, num_ws, w_dim], cameras [n, 25]) on G's device: seeded faces, yaws -20..25, pitch 5."""
    device = next(G.parameters()).device
    z = torch.randn(n, G.z_dim, generator=torch.Generator().manual_seed(1)).to(device)
    with torch.no_grad():
        ws = G.mapping(z, frontal_camera(n).to(device), truncation_psi=0.7)
    return ws, lookat_camera(torch.linspace(-20.0, 25.0, n), 5.0).to(device)


def synth(G, ws, cams, nrr: int | None = None, fn=None, channels_last: bool = False) -> dict[str, torch.Tensor]:
    """Deterministic synthesis, outputs as fp32 (autocast may return half)."""
    fn = fn or G.synthesis
    extra = {"channels_last": True} if channels_last else {}
    with torch.no_grad():
        out = fn(ws, cams, neural_rendering_resolution=nrr, noise_mode="const", sampling="deterministic", **extra)
    return {"image": out["image"].float(), "raw": out["image_raw"].float(), "depth": out["image_depth"].float()}


def compare(ctx: Ctx, label: str, out: dict, ref: dict, tol: str) -> None:
    """Expect out's image within TOLERANCES[tol] of ref; record raw / depth differences beside it."""
    limit_max, limit_mean, source = TOLERANCES[tol]
    img_max, img_mean = max_mean_diff(out["image"], ref["image"])  # NaN or inf anywhere fails the limit
    ctx.expect(f"{label}: image max abs diff", img_max, limit_max, source)
    if limit_mean is not None:
        ctx.expect(f"{label}: image mean abs diff", img_mean, limit_mean, source)
    ctx.number(f"{label}: raw / depth max abs diff",
               [round(max_mean_diff(out[k], ref[k])[0], 7) for k in ("raw", "depth")])


# --- 1. parity ---------------------------------------------------------------------------------


def check_parity(ctx: Ctx) -> None:
    """Device fp32 (TF32 off, and torch's default TF32) vs CPU fp32; bf16 / fp16 autocast vs device fp32."""
    configs = ["tiny"] if ctx.quick else ["tiny", FULL]
    ctx.number("torch default TF32 (matmul, cuDNN)",
               [torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32])
    if not ctx.cuda:
        ctx.note("device is the CPU: device-vs-CPU rows left out (identical); fp16 autocast is CUDA only")
    for config in configs:
        G = seeded_generator(config)
        ws, cams = latents(G, 2)
        ref_cpu = synth(G, ws, cams)
        ref = ref_cpu
        Gd, wsd, camsd = copy.deepcopy(G).to(ctx.device), ws.to(ctx.device), cams.to(ctx.device)
        if ctx.cuda:
            with tf32(False):
                ref = synth(Gd, wsd, camsd)
            compare(ctx, f"{config} CUDA fp32 (TF32 off) vs CPU fp32", ref, ref_cpu, "fp32")
            # As the CLI runs it: torch's default flags (cuDNN convolutions in TF32, matmuls not).
            compare(ctx, f"{config} CUDA fp32 (torch's default TF32 flags) vs CPU fp32", synth(Gd, wsd, camsd),
                    ref_cpu, "tf32")
        for amp in ("bf16", "fp16"):
            if amp == "fp16" and not ctx.cuda:
                continue
            with tf32(False), autocast(ctx.device, amp):
                out = synth(Gd, wsd, camsd)
            compare(ctx, f"{config} {ctx.device.type} {amp} autocast vs {ctx.device.type} fp32", out, ref, amp)
        del G, Gd
        if ctx.cuda:
            torch.cuda.empty_cache()
    ctx.summary(f"{len(configs)} config(s): " + ", ".join(configs))


# --- 2. torch.compile --------------------------------------------------------------------------


def check_compile(ctx: Ctx, backend: str | None = None) -> None:
    """Compiled synthesis vs eager (TF32 off in both): max diff, first-call (compile) seconds, speedup per view.

    Shapes after the first are compiled only while the check's time allows another compile.
    """
    config = "tiny" if ctx.quick else FULL
    G = seeded_generator(config).to(ctx.device)
    nrr_full = int(G.neural_rendering_resolution)
    shapes = [(nrr_full, 1), (nrr_full, 8), (nrr_full // 2, 1), (nrr_full // 2, 8)]
    if ctx.quick:
        shapes = shapes[:2]
    ctx.number("backend", backend or "inductor (or $MY3DGEN_COMPILE_BACKEND)")
    ctx.note("TF32 off in eager and compiled (a clean difference); render's fp32 column uses torch's default")
    repeats = 1 if ctx.quick else 3
    last_compile = 0.0
    with tf32(False):
        for nrr, n in shapes:
            if last_compile and ctx.left() < 1.5 * last_compile + 10:
                ctx.note(f"nrr {nrr} batch {n} left out: not enough time for another compile")
                continue
            ws, cams = latents(G, n)
            fn = compiled(G.synthesis, backend=backend)  # a fresh torch.compile per shape (static shapes)
            ctx.sync()
            t0 = time.perf_counter()
            out_c = synth(G, ws, cams, nrr, fn)
            ctx.sync()
            last_compile = time.perf_counter() - t0
            out_e = synth(G, ws, cams, nrr)
            compare(ctx, f"nrr {nrr} batch {n} compiled vs eager", out_c, out_e, "compile")
            runs = {"eager": lambda ws=ws, cams=cams, nrr=nrr: synth(G, ws, cams, nrr),
                    "compiled": lambda ws=ws, cams=cams, nrr=nrr, fn=fn: synth(G, ws, cams, nrr, fn)}
            best = interleaved(runs, repeats, ctx.sync)
            ctx.row("compile", {"neural res": nrr, "batch": n, "compile s (first call)": round(last_compile, 1),
                                "eager s/view": round(best["eager"] / n, 4),
                                "compiled s/view": round(best["compiled"] / n, 4),
                                "speedup": round(best["eager"] / best["compiled"], 2)})
    rows = ctx.result["tables"].get("compile", [])
    ctx.summary("; ".join(f"{r['neural res']}/b{r['batch']}: {r['speedup']}x after {r['compile s (first call)']} s"
                          for r in rows))


# --- 3. render time per view -------------------------------------------------------------------


def check_render(ctx: Ctx) -> None:
    """Seconds per view and peak memory at each neural resolution and batch, fp32 / bf16 / fp16 (and fp16 in
    NHWC, the CUDA default of --amp: `speed.use_channels_last`), torch defaults."""
    config = "tiny" if ctx.quick else FULL
    G = seeded_generator(config).to(ctx.device)
    nrr_full = int(G.neural_rendering_resolution)
    batches = (1, 2) if ctx.quick else (1, 8)
    amps = ["off", "bf16"] + (["fp16", "fp16+nhwc"] if ctx.cuda else [])
    repeats = 1 if ctx.quick else 3
    ctx.number("config", config)
    if ctx.cuda:
        ctx.note("torch's default TF32 settings (cuDNN convolutions in TF32): what `render --amp off` gets")
    finite: list[bool] = []
    for n in batches:
        ws, cams = latents(G, n)
        for nrr in (nrr_full // 2, nrr_full):
            if ctx.left() < 5:
                ctx.note(f"nrr {nrr} batch {n} left out: time cap")
                continue

            def run(amp: str, ws=ws, cams=cams, nrr=nrr) -> dict:
                dtype, _, layout = amp.partition("+")
                with autocast(ctx.device, dtype):
                    return synth(G, ws, cams, nrr, channels_last=layout == "nhwc")

            runs = {amp: (lambda amp=amp: run(amp)) for amp in amps}
            best = interleaved(runs, repeats, ctx.sync)
            row: dict = {"neural res": nrr, "batch": n}
            row.update({f"{'fp32' if amp == 'off' else amp} s/view": round(best[amp] / n, 4) for amp in amps})
            for amp in amps:
                reset_peak(ctx)
                finite.append(all_finite(run(amp)))
                row[f"{'fp32' if amp == 'off' else amp} peak MiB"] = peak_mib(ctx)
            ctx.row("render", row)
    ctx.expect_true(f"every render finite ({len(finite)} renders)", all(finite), len(finite))
    rows = ctx.result["tables"].get("render", [])
    top = [r for r in rows if r["neural res"] == nrr_full and r["batch"] == 1]
    if top:
        ctx.summary(f"nrr {nrr_full} batch 1: " + ", ".join(f"{k.split()[0]} {v} s" for k, v in top[0].items()
                                                            if k.endswith("s/view")) + " per view")


# --- 4. personalization speed ------------------------------------------------------------------


def loss_nets(ctx: Ctx) -> tuple:
    """(training LPIPS-alex, anchor LPIPS-VGG, symmetry distance) with random weights: the paper's
    losses at their real cost. LPIPS needs the `lpips` package; without it, pixel losses (said in a note).
    --quick: pixel losses and MSE symmetry (seconds on a CPU)."""
    from my3dgen_cli.losses.arcface import build_arcface
    from my3dgen_cli.personalize.symmetry import identity_distance

    if ctx.quick:
        ctx.note("--quick: pixel losses and MSE symmetry (no LPIPS / ArcFace cost)")
        return None, None, None
    sym = identity_distance(build_arcface(None).to(ctx.device))
    try:
        from my3dgen_cli.losses.perceptual import build_lpips

        alex, vgg = build_lpips("alex").to(ctx.device), build_lpips("vgg").to(ctx.device)
    except ImportError:
        ctx.note("`lpips` is not installed: step times use pixel losses (LPIPS's cost not included)")
        alex = vgg = None
    return alex, vgg, sym


def check_personalize(ctx: Ctx) -> None:
    """Seconds per training step (10 photos, batch 2, ArcFace symmetry every 4th step) per variant, peak
    memory, and the projected time of one identity for each --budget."""
    from my3dgen_cli.personalize.pipeline import BUDGETS

    config = "tiny" if ctx.quick else FULL
    steps = 1 if ctx.quick else 3
    G = seeded_generator(config).to(ctx.device)
    images, raws, cams, ws = photos_of(G)
    # Mirrored photos: a real residual, so step losses can be compared across variants (the renders
    # themselves give a loss of ~0). The cost per step is the same.
    data = (images.flip(-1), raws.flip(-1), cams, ws)
    alex, vgg, sym = loss_nets(ctx)
    variants = [("fp32", {}), ("bf16", {"amp": "bf16"})]
    if ctx.cuda:
        variants.append(("fp16 + GradScaler", {"amp": "fp16"}))
    variants.append(("activation checkpointing", {"act_checkpointing": True}))
    ctx.number("config", config)
    per_step: dict[str, float] = {}
    first_loss: dict[str, float] = {}
    finite: list[bool] = []
    for label, options in variants:
        if per_step and ctx.left() < 3 * max(per_step.values()) * (steps + 1) + 10:
            ctx.note(f"{label} left out: time cap")
            continue
        records: list[dict] = []
        reset_peak(ctx)
        sps = time_steps(G, data, steps, ctx.sync, lpips=alex, sym_distance=sym, records=records, **options)
        per_step[label], first_loss[label] = sps, records[0]["loss"]
        finite.append(all(torch.isfinite(torch.tensor(r["loss"])) for r in records))
        ctx.row("steps", {"variant": label, "s/step": round(sps, 4), "vs fp32": round(per_step["fp32"] / sps, 2),
                          "peak MiB": peak_mib(ctx), "step-1 loss": round(records[0]["loss"], 5)})
    ctx.expect_true(f"every step's loss finite ({len(finite)} variants)", all(finite), len(finite))
    for label, loss in first_loss.items():
        if label.startswith(("bf16", "fp16")):
            ctx.expect(f"{label}: step-1 loss vs fp32", abs(loss - first_loss["fp32"]), LOSS_AMP_ATOL,
                       "scale.md: bf16 step losses within 0.005")
        elif label != "fp32":
            ctx.expect(f"{label}: step-1 loss vs fp32 (relative)", abs(loss / first_loss["fp32"] - 1), LOSS_EXACT_RTOL,
                       "same math recomputed")
    anchor_s = time_anchor_step(G, data, ctx.sync, lpips=vgg)
    chunks = -(-data[0].shape[0] // 4)
    ctx.number("anchor step s (4 photos)", round(anchor_s, 4))
    for budget, (train_steps, anchor_steps) in BUDGETS.items():
        row: dict = {"budget": budget, "steps / anchor steps": f"{train_steps} / {anchor_steps}"}
        for label, sps in per_step.items():
            row[f"{label} min"] = round((anchor_s * anchor_steps * chunks + sps * train_steps) / 60, 2)
        ctx.row("identity (10 photos, projected)", row)
    paper = ctx.result["tables"]["identity (10 photos, projected)"][-1]
    best = min((v, k) for k, v in paper.items() if k.endswith(" min"))
    ctx.summary(f"fp32 {per_step['fp32']:.3f} s/step; --budget paper projected {paper['fp32 min']} min fp32, "
                f"fastest {best[1][:-4]} {best[0]} min")
    if ctx.cuda and not ctx.quick:
        ctx.expect("10 photos, --budget paper, fastest variant, projected minutes", best[0], MINUTES_LIMIT,
                   "'an identity of 10 photos in minutes on one modern GPU'")
