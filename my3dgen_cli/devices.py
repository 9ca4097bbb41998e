"""Device choice for commands. Library code takes devices from its tensors; only the CLI picks one."""

from __future__ import annotations

import torch

from my3dgen_cli.errors import UserInputError

DEVICE_CHOICES = ("auto", "cpu", "cuda", "mps")


def pick_device(name: str = "auto") -> torch.device:
    """"auto" = CUDA if available, else MPS, else CPU. An unavailable explicit choice is an error."""
    if name not in DEVICE_CHOICES and not name.startswith("cuda:"):
        raise UserInputError(f"--device: got {name!r}, expected one of {', '.join(DEVICE_CHOICES)}")
    cuda = torch.cuda.is_available()
    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if name == "auto":
        return torch.device("cuda" if cuda else "mps" if mps else "cpu")
    if name.startswith("cuda") and not cuda:
        raise UserInputError(f"--device {name}: CUDA is not available on this machine (try --device cpu)")
    if name == "mps" and not mps:
        raise UserInputError("--device mps: Apple MPS is not available on this machine (try --device cpu)")
    return torch.device(name)
