"""The anchor stage of `personalize`: every photo projected in chunks that survive an interruption.

Photos are projected (anchors.project_to_w) in chunks of `config.anchor_batch` photos (4 by
default; the demo projects its 10 photos in one: a bigger batch keeps both cores of a small CPU busy).
After each round of chunks rank 0 writes the anchors finished so far to the identity's partial-anchors
file (atomically), so Ctrl-C or a crash loses at most the chunks in flight; `--resume` reuses the finished ones and
projects only the rest. The partial file carries a fingerprint (photo names, base, anchor
settings); a resumed run with another one is refused with a one-line error, as a training
checkpoint made with other settings is.

A chunk's anchors depend only on its photos: projection starts at w_avg, renders with constant
noise and deterministic sampling, and draws no random numbers, so projecting chunk k in a resumed
process gives the same bits as in an uninterrupted one. Under torchrun the chunks still to do are
shared among the ranks (the i-th of them on rank i mod world) and broadcast after each round; the
chunks are the ones one process uses, so the anchors do not depend on the number of ranks.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from my3dgen_cli.errors import My3DGenError, UserInputError
from my3dgen_cli.personalize import anchors
from my3dgen_cli.personalize.distributed import SINGLE, Dist, broadcast_, fault_hook


class AnchorsInterrupted(My3DGenError):
    """Ctrl-C (or a callback's KeyboardInterrupt) while projecting anchors."""

    exit_code = 130

    def __init__(self, done: int, total: int, path: Path | None) -> None:
        if path is not None:
            where = (f"{done} of {total} photos projected, saved to {path}; "
                     "run the same command with --resume to continue")
        else:
            where = "no chunk of photos finished yet; run the same command again to start over"
        super().__init__(f"interrupted while projecting anchors ({where})")
        self.done, self.total, self.path = done, total, path


def anchor_fingerprint(config: Any, photos: list[str], base: str, base_sha256: str,
                       lpips: nn.Module | None) -> dict[str, Any]:
    """What a partial-anchors file must share with the run that reuses it."""
    return {"photos": list(photos), "base": base, "base_sha256": base_sha256, "anchor_steps": config.anchor_steps,
            "anchor_space": config.anchor_space, "anchor_lr": config.anchor_lr, "chunk": config.anchor_batch,
            "anchor_lpips": lpips is not None}


def _check_fingerprint(path: Path, saved: dict[str, Any], now: dict[str, Any]) -> None:
    """One-line error naming the first setting that differs (photos: the first differing name)."""
    for key in sorted(set(saved) | set(now)):
        a, b = saved.get(key), now.get(key)
        if a == b:
            continue
        if key == "photos" and isinstance(a, list) and isinstance(b, list):
            first = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
            old = repr(a[first]) if first < len(a) else "none"
            new = repr(b[first]) if first < len(b) else "none"
            what = f"{len(a)} photos, this run has {len(b)} (photo {first + 1}: {old} vs {new})"
        else:
            what = f"{key}={a!r}, this run has {key}={b!r}"
        raise UserInputError(f"--resume: the partial anchors in {path} were made with {what}; rerun with the same "
                             "photos and settings, or with --force instead of --resume to start over")


def _reuse(path: Path, fingerprint: dict[str, Any], n: int, shape: tuple[int, int], chunk: int) -> torch.Tensor | None:
    """The saved anchors of the first M photos (a whole number of chunks), checked; None if no file."""
    from my3dgen_cli.identity import read_partial_anchors

    loaded = read_partial_anchors(path)
    if loaded is None:
        return None
    ws, saved = loaded.ws, loaded.fingerprint
    _check_fingerprint(path, saved, fingerprint)
    m = ws.shape[0]
    if ws.ndim != 3 or tuple(ws.shape[1:]) != shape or m > n or (m % chunk and m != n):
        raise UserInputError(f"{path}: got anchors of shape {tuple(ws.shape)}, expected (M, {shape[0]}, {shape[1]}) "
                             f"with M a multiple of {chunk} up to {n}; pass --force instead of --resume to start over")
    return ws


def project_anchors(
    G: nn.Module,
    images: torch.Tensor,
    cameras: torch.Tensor,
    config: Any,
    lpips: nn.Module | None,
    *,
    partial: Path | None = None,
    fingerprint: dict[str, Any] | None = None,
    resume: bool = False,
    world: Dist = SINGLE,
    on_step: Callable[[int, float], None] | None = None,
    on_reused: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """Anchors ws [N, num_ws, w_dim] of all photos (images [N, 3, H, W], cameras [N, 25]).

    config: anchor_steps, anchor_space, anchor_lr (a PersonalizeConfig). partial: the partial-anchors
    file, written by rank 0 after each round while chunks remain (None: nothing saved);
    fingerprint: stored in it (anchor_fingerprint). resume: start from that file's anchors (checked
    against `fingerprint`; every rank reads it). on_step(step, loss) after each projection step;
    on_reused(photos) once when saved anchors were reused. Raises AnchorsInterrupted on Ctrl-C.
    """
    from my3dgen_cli.identity import PartialAnchors, write_partial_anchors

    n, chunk = images.shape[0], config.anchor_batch
    ws = torch.empty(n, G.num_ws, G.w_dim, device=images.device)
    starts = list(range(0, n, chunk))
    first = 0  # chunks already done
    if resume and partial is not None:
        saved = _reuse(partial, fingerprint or {}, n, (G.num_ws, G.w_dim), chunk)
        if saved is not None:
            ws[:saved.shape[0]] = saved.to(ws.device)
            first = -(-saved.shape[0] // chunk)
            if on_reused is not None:
                on_reused(saved.shape[0])
    done = min(first * chunk, n)
    try:
        for round_start in range(first, len(starts), world.world):
            chunks = range(round_start, min(round_start + world.world, len(starts)))
            for owner, k in enumerate(chunks):
                if owner == world.rank:
                    fault_hook(k, world, "anchors")
                    part = slice(starts[k], starts[k] + chunk)
                    ws[part] = anchors.project_to_w(G, images[part], cameras[part], config.anchor_steps,
                                                    space=config.anchor_space, lr=config.anchor_lr, lpips=lpips,
                                                    batch=chunk, on_step=on_step)
            for owner, k in enumerate(chunks):
                part = slice(starts[k], starts[k] + chunk)
                ws[part] = broadcast_(ws[part].contiguous(), owner, world)
            finished = min(starts[chunks[-1]] + chunk, n)
            if partial is not None and world.is_main and finished < n:
                write_partial_anchors(partial, PartialAnchors(ws[:finished], fingerprint or {}))
            done = finished  # only now: a Ctrl-C during the save leaves the previous file (atomic write)
    except KeyboardInterrupt:
        saved_path = partial if partial is not None and partial.is_file() else None
        raise AnchorsInterrupted(done if saved_path else 0, n, saved_path) from None
    return ws
