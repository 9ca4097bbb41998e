"""Device choice for commands. Library code takes devices from its tensors; only the CLI picks one."""

from __future__ import annotations

import os
import re

import torch

from my3dgen_cli.errors import UserInputError

DEVICE_CHOICES = ("auto", "cpu", "cuda", "mps")


def pick_device(name: str = "auto") -> torch.device:
    """"auto" = CUDA if available, else MPS, else CPU. An unavailable explicit choice is an error."""
    if name not in DEVICE_CHOICES and not re.fullmatch(r"cuda:\d+", name):
        raise UserInputError(f"--device: got {name!r}, expected one of {', '.join(DEVICE_CHOICES)} or cuda:N")
    cuda = torch.cuda.is_available()
    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if name == "auto":
        name = "cuda" if cuda else "mps" if mps else "cpu"
    if name.startswith("cuda") and not cuda:
        raise UserInputError(f"--device {name}: CUDA is not available on this machine (try --device cpu)")
    if name == "mps" and not mps:
        raise UserInputError("--device mps: Apple MPS is not available on this machine (try --device cpu)")
    device = torch.device(name)
    if device.index is not None:
        check_gpu_index(device.index, f"--device {name}")
    if device.type == "cuda":
        exact_fp32_on_cuda()
    return device


def exact_fp32_on_cuda() -> None:
    """Turn TF32 off so fp32 on a GPU is fp32, as the official EG3D scripts do.

    cuDNN convolutions run in TF32 (10-bit mantissa) by default, which moves images by ~1e-3
    and breaks parity with the published model; `--amp` is the speed path. MY3DGEN_TF32=1 keeps
    torch's defaults for users who prefer TF32's speed.
    """
    if os.environ.get("MY3DGEN_TF32", "") == "1":
        return
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


def check_gpu_index(index: int, what: str) -> None:
    """A CUDA index beyond the visible GPUs fails deep inside CUDA; say so in one line instead."""
    count = torch.cuda.device_count()
    if index >= count:
        raise UserInputError(f"{what}: got GPU {index}, but this machine shows {count} GPU(s) "
                             f"(indices 0..{count - 1}; CUDA_VISIBLE_DEVICES narrows them)")
