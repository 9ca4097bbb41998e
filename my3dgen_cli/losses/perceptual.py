"""LPIPS that works offline: linear heads from the `lpips` wheel, backbone weights from the zoo.

`lpips` normally lets torchvision download the AlexNet/VGG backbone at run time, silently. We build it
with a random backbone (`pnet_rand=True`, nothing downloaded) and copy in the torchvision weights that
the zoo verified (`lpips-alexnet` / `lpips-vgg16`), fetched visibly on demand (or taken from torch
hub's cache when the user has them there). A failed or mismatched download is an error, never a
quiet switch to pixel losses; only an offline run with the weights not cached may go on without them
(`perceptual_loss(..., required=False)` returns None), and the caller says so (`offline_fallback`).
"""

from __future__ import annotations

import re

import torch
from torch import nn

from my3dgen_cli.errors import ArtifactError, OfflineError
from my3dgen_cli.output import Output

ZOO_NAMES = {"alex": "lpips-alexnet", "vgg": "lpips-vgg16"}


def _backbone_state(net: str, offline: bool | None, output: Output | None = None) -> dict[str, torch.Tensor]:
    from my3dgen_cli import zoo

    path = zoo.ensure(ZOO_NAMES[net], offline=offline, display=zoo.Display(output))
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


def perceptual_loss(
    net: str = "alex", offline: bool | None = None, required: bool = True, output: Output | None = None
) -> nn.Module | None:
    """LPIPS with verified pretrained backbone weights, fetched first (visibly, on `output`) if need be.

    Not cached in an offline run: OfflineError, or None when not `required` (the caller warns with
    `offline_fallback`). A network or checksum failure always raises, saying what to do.
    """
    try:
        state = _backbone_state(net, offline, output)
    except OfflineError:
        if required:
            raise
        return None
    return build_lpips(net, state)


def offline_fallback(names: list[str], instead: str) -> str:
    """The warning of an offline run that goes on without loss weights: which, what instead, and the fix."""
    them = "it" if len(names) == 1 else "them"
    return (
        f"{' and '.join(names)} {'is' if len(names) == 1 else 'are'} not cached and this run is offline "
        f"(MY3DGEN_OFFLINE, --offline, or the demo): {instead}; fetch {them} with network access for the "
        f"full loss: `my3dgen fetch {' '.join(names)}` (or import a copy with `--from FILE`)"
    )
