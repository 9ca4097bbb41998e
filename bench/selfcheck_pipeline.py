"""The pipeline checks of bench/gpu_selfcheck.py: the real CLI end to end, and NCCL data parallelism.

Both run `python -m my3dgen_cli` in subprocesses on a tiny local base ("selfcheck-tiny", random
weights from seed 0) and photos of a hidden "person" (the base plus a rank-1 adapter) with a
dataset.json, in a temporary MY3DGEN_HOME with MY3DGEN_OFFLINE=1: no network, no zoo artifacts, so
the offline fallbacks run (pixel losses instead of LPIPS, MSE symmetry instead of ArcFace, no MTCNN
since the crops come with cameras).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.selfcheck_core import NCCL_ADAPTER_ATOL, ROOT, Ctx, child_env

BASE = "selfcheck-tiny"
YAWS = (-40.0, -17.0, -6.0, 17.0, 40.0)


def make_home() -> Path:
    """A fresh MY3DGEN_HOME (this process's too) with the tiny base and 5 photos + dataset.json in photos/."""
    from my3dgen_cli.eg3d import build_generator
    from my3dgen_cli.eg3d.camera import frontal_camera, lookat_camera
    from my3dgen_cli.fileio import write_text_atomic
    from my3dgen_cli.generators import save_local_base
    from my3dgen_cli.lora import adapter_layers, add_adapters
    from my3dgen_cli.media import to_uint8, write_png

    home = Path(tempfile.mkdtemp(prefix="my3dgen-selfcheck-"))
    os.environ["MY3DGEN_HOME"] = str(home)
    os.environ["MY3DGEN_OFFLINE"] = "1"
    torch.manual_seed(0)
    G = build_generator("tiny").eval()
    save_local_base(G, BASE)
    g = torch.Generator().manual_seed(123)
    add_adapters(G, rank=1, generator=g)
    cams = lookat_camera(list(YAWS), 0.0)
    with torch.no_grad():
        for a in adapter_layers(G).values():
            a.lora_B.normal_(0.0, 1.0, generator=g)
        w = G.mapping(torch.randn(1, G.z_dim, generator=torch.Generator().manual_seed(7)), frontal_camera(1), 0.7)
        images = G.synthesis(w.expand(len(YAWS), -1, -1), cams, noise_mode="const")["image"]
    photos = home / "photos"
    photos.mkdir()
    labels = []
    for i, (image, cam) in enumerate(zip(images, cams, strict=True)):
        write_png(photos / f"view{i}.png", to_uint8(image))
        labels.append([f"view{i}.png", cam.tolist()])
    write_text_atomic(photos / "dataset.json", json.dumps({"labels": labels}))
    return home


def my3dgen(ctx: Ctx, args: list[str], torchrun: int = 0) -> tuple[subprocess.CompletedProcess | None, float]:
    """Run the CLI (under torchrun with `torchrun` ranks when > 0); (process or None on timeout, seconds)."""
    cmd = [sys.executable, "-m", "my3dgen_cli", *args]
    if torchrun:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(torchrun), "--master_addr",
               "127.0.0.1", "--master_port", str(port), "-m", "my3dgen_cli", *args]
    t0 = time.perf_counter()
    # Its own process group, so a timeout kills torchrun's ranks too, not only torchrun.
    proc = subprocess.Popen(cmd, cwd=ROOT, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=max(5.0, ctx.left()))
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        return None, time.perf_counter() - t0
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr), time.perf_counter() - t0


def json_of(proc: subprocess.CompletedProcess) -> dict:
    text = proc.stdout
    return json.loads(text[text.index("{"):]) if "{" in text else {}


def last_line(proc: subprocess.CompletedProcess | None) -> str:
    if proc is None:
        return "timed out"
    lines = [line for line in (proc.stderr + proc.stdout).strip().splitlines() if line.strip()]
    return lines[-1][-300:] if lines else ""


# --- 5. NCCL -----------------------------------------------------------------------------------


def nccl_smoke(ctx: Ctx) -> str:
    """One-rank NCCL process group + all_reduce on this GPU: the NCCL library loads and runs."""
    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        t = torch.ones(4, device=ctx.device)
        dist.all_reduce(t)
        ok = bool((t == 1).all())
    finally:
        dist.destroy_process_group()
    return f"NCCL {torch.cuda.nccl.version()} one-rank all_reduce {'ok' if ok else 'WRONG'}"


def check_nccl(ctx: Ctx) -> None:
    """2 ranks under torchrun (NCCL) personalize one identity = one process, adapters within NCCL_ADAPTER_ATOL."""
    from my3dgen_cli.adapter_file import read_adapter
    from my3dgen_cli.identity import identity_paths

    if not ctx.cuda:
        ctx.skip("skipped (no CUDA device: needs 2 GPUs; gloo on CPU is tests/test_scale_distributed.py)")
    count = torch.cuda.device_count()
    ctx.number("GPUs", count)
    if count < 2:
        try:
            ctx.note(nccl_smoke(ctx))
        except Exception as exc:  # noqa: BLE001 - reported, the check is skipped either way
            ctx.note(f"one-rank NCCL all_reduce failed: {type(exc).__name__}: {exc}")
        ctx.skip("skipped (1 GPU): 2 NCCL ranks need 2 GPUs (NCCL refuses two ranks on one GPU, and "
                 "personalize refuses more ranks than GPUs)")
    home = make_home()
    try:
        train = [str(home / "photos"), "--base", BASE, "--steps", "4", "--anchor-steps", "2", "--batch", "2",
                 "--sym-every", "2", "--device", "cuda", "--checkpoint-every", "0", "--quiet"]
        ddp, ddp_s = my3dgen(ctx, ["personalize", "--name", "ddp", *train], torchrun=2)
        ctx.expect_true("torchrun 2 ranks (NCCL) personalize: exit 0", ddp is not None and ddp.returncode == 0,
                        last_line(ddp) if ddp is None or ddp.returncode else f"{ddp_s:.1f} s")
        one, one_s = my3dgen(ctx, ["personalize", "--name", "one", *train])
        ctx.expect_true("one process personalize: exit 0", one is not None and one.returncode == 0,
                        last_line(one) if one is None or one.returncode else f"{one_s:.1f} s")
        if ddp is None or one is None or ddp.returncode or one.returncode:
            return
        a, b = read_adapter(identity_paths("ddp").adapter).tensors, read_adapter(identity_paths("one").adapter).tensors
        ctx.expect_true("same adapter tensors", a.keys() == b.keys())
        diff = max(float((a[k] - b[k]).abs().max()) for k in a)
        ctx.expect("2 ranks vs 1 process: adapter max |diff|", diff, NCCL_ADAPTER_ATOL,
                   "gloo measures 2e-5 (scale.md); GPU kernels are less reproducible")
        ctx.summary(f"2 NCCL ranks vs 1 process: adapter max diff {diff:.2g} ({ddp_s:.0f} s vs {one_s:.0f} s)")
    finally:
        shutil.rmtree(home, ignore_errors=True)


# --- 6. the CLI end to end ---------------------------------------------------------------------


def check_cli(ctx: Ctx) -> None:
    """personalize -> invert -> render --amp -> export onnx through `python -m my3dgen_cli`: exit codes 0."""
    home = make_home()
    dev = str(ctx.device)
    amp = "fp16" if ctx.cuda else "bf16"
    photos, out = home / "photos", home / "out"
    steps = [
        ("personalize", ["personalize", str(photos), "--name", "selfcheck", "--base", BASE, "--steps", "6",
                         "--anchor-steps", "3", "--device", dev, "--checkpoint-every", "0", "--json"]),
        ("invert", ["invert", str(photos / "view2.png"), "--labels", str(photos / "dataset.json"), "--identity",
                    "selfcheck", "--steps", "10", "--device", dev, "-o", str(out / "invert"), "--json"]),
        ("render", None),  # needs invert's latent
        ("export onnx", ["export", "-i", "selfcheck", "-o", str(out / "selfcheck.onnx"), "--json"]),
    ]
    latent = None
    try:
        for name, args in steps:
            if name == "render":
                if latent is None:
                    ctx.expect_true("render: not run (no latent from invert)", False)
                    continue
                args = ["render", "--latent", latent, "--identity", "selfcheck", "--yaw", "-30,0,30", "--amp", amp,
                        "--device", dev, "-o", str(out / "render"), "--json"]
            if ctx.left() < 5:
                ctx.expect_true(f"{name}: not run (time cap)", False)
                continue
            proc, seconds = my3dgen(ctx, args)
            ok = proc is not None and proc.returncode == 0
            data = json_of(proc) if ok else {}
            result = last_line(proc) if not ok else _what(name, data)
            shown = [Path(a).name if os.sep in a else a for a in args if a != "--json"]  # temp paths: names only
            ctx.row("commands", {"command": "my3dgen " + " ".join(shown),
                                 "exit": None if proc is None else proc.returncode, "seconds": round(seconds, 1),
                                 "result": result})
            ctx.expect_true(f"{name}: exit code 0", ok, result)
            if ok and name == "invert":
                latent = data["results"][0]["files"]["latent"]
            if ok and name == "render":
                written = sum(Path(o["path"]).is_file() for o in data["outputs"])
                ctx.expect_true("render: 3 images written", written == 3, written)
            if ok and name == "export onnx":
                ctx.expect("export: onnxruntime vs PyTorch max abs diff", data["max_abs_diff"], data["tolerance"],
                           "export --tolerance")
        ctx.summary(f"device {dev}, render --amp {amp}: " + ", ".join(
            f"{r['command'].split()[1]} {r['exit']}" for r in ctx.result["tables"].get("commands", [])))
    finally:
        shutil.rmtree(home, ignore_errors=True)


def _what(name: str, data: dict) -> str:
    if name == "personalize":
        return f"final loss {data.get('final_loss', float('nan')):.4f}, symmetry {data.get('sym_loss')}"
    if name == "invert":
        return f"PSNR {data['results'][0]['psnr']} dB"
    if name == "render":
        return f"{len(data.get('outputs', []))} files"
    return f"max diff {data.get('max_abs_diff', float('nan')):.2g}, {data.get('size', 0) / 2**20:.1f} MiB"
