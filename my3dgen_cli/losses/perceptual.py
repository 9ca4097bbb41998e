"""LPIPS that works offline: linear heads from the `lpips` wheel, backbone weights from the zoo.

`lpips` normally lets torchvision download the AlexNet/VGG backbone at run time. We build it with a
random backbone (`pnet_rand=True`, nothing downloaded) and copy in the torchvision weights that
the zoo verified (`lpips-alexnet` / `lpips-vgg16`). When those are not cached and the network may
not be used, `perceptual_loss(..., required=False)` returns None and callers fall back to pixel
losses, saying so once.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from my3dgen_cli.errors import ArtifactError

ZOO_NAMES = {"alex": "lpips-alexnet", "vgg": "lpips-vgg16"}


def _backbone_state(net: str, offline: bool | None) -> dict[str, torch.Tensor]:
    from my3dgen_cli.zoo import cache as zoo

    path = zoo.ensure(ZOO_NAMES[net], offline=offline)
    state = torch.load(path, map_location="cpu", weights_only=True)
    # torchvision "features.{i}.weight" -> lpips "slice{k}.{i}.weight" (layer index i is kept).
    return {f"features.{m.group(1)}.{m.group(2)}": v for k, v in state.items()
            if (m := re.fullmatch(r"features\.(\d+)\.(weight|bias)", k))}


def build_lpips(net: str = "alex", backbone_state: dict[str, torch.Tensor] | None = None) -> nn.Module:
    """An LPIPS module (eval, frozen). backbone_state: torchvision `features.*` tensors, or None = random."""
    import warnings

    import lpips

    with warnings.catch_warnings():  # torchvision's deprecation notes about `pretrained=False`
        warnings.simplefilter("ignore", UserWarning)
        model = lpips.LPIPS(net=net, pretrained=True, pnet_rand=True, verbose=False)
    if backbone_state is not None:
        slices = {}
        for name, _ in model.net.named_parameters():
            index, kind = name.split(".")[1:]
            slices[f"features.{index}.{kind}"] = name
        missing = sorted(set(slices) - set(backbone_state))
        if missing:
            raise ArtifactError(f"LPIPS backbone weights lack {missing[0]}")
        model.net.load_state_dict({slices[k]: backbone_state[k] for k in slices}, strict=True)
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def perceptual_loss(net: str = "alex", offline: bool | None = None, required: bool = True) -> nn.Module | None:
    """LPIPS with verified pretrained backbone weights; None if unavailable and not `required`."""
    try:
        state = _backbone_state(net, offline)
    except ArtifactError:
        if required:
            raise
        return None
    return build_lpips(net, state)
