"""The pretrained networks personalization's losses use (LPIPS for anchors and training, ArcFace for symmetry)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from my3dgen_cli.output import Output
from my3dgen_cli.personalize.config import PersonalizeConfig


@dataclass
class LossNets:
    """The pretrained networks the losses use; None = unavailable (pixel / LPIPS fallbacks)."""

    anchor_lpips: nn.Module | None
    train_lpips: nn.Module | None
    identity: nn.Module | None

    @classmethod
    def load(cls, config: PersonalizeConfig, offline: bool | None = None, output: Output | None = None,
             warn: bool = True) -> LossNets:
        """LPIPS-VGG for anchors, LPIPS-alex for training, ArcFace for symmetry: from the zoo, with one warning for
        the missing LPIPS and one for ArcFace (`warn=False`: the caller says what is missing itself, as the demo)."""
        from my3dgen_cli.losses.arcface import identity_network
        from my3dgen_cli.losses.perceptual import offline_fallback, perceptual_loss

        out = output or Output("quiet")
        vgg = perceptual_loss("vgg", offline=offline, required=False, output=output)
        alex = perceptual_loss("alex", offline=offline, required=False, output=output)
        if warn and (alex is None or vgg is None):
            missing = [n for n, m in (("lpips-vgg16", vgg), ("lpips-alexnet", alex)) if m is None]
            out.warn(offline_fallback(missing, "using pixel losses instead of LPIPS"))
        ident = None
        if config.sym and config.sym_loss == "id":
            ident = identity_network(offline=offline, output=output)
            if ident is None and warn:
                instead = "LPIPS" if alex is not None else "pixel MSE"
                out.warn(offline_fallback(["arcface-ir-se50"], f"the symmetry term uses {instead} instead"))
        return cls(vgg, alex, ident)

    def to(self, device: torch.device) -> LossNets:
        return LossNets(*(m.to(device) if m is not None else None
                          for m in (self.anchor_lpips, self.train_lpips, self.identity)))
