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
    def load(cls, config: PersonalizeConfig, offline: bool | None = None, output: Output | None = None) -> LossNets:
        """LPIPS-VGG for anchors, LPIPS-alex for training, ArcFace for symmetry: from the zoo, with one warning each."""
        from my3dgen_cli.losses.arcface import identity_network
        from my3dgen_cli.losses.perceptual import perceptual_loss

        out = output or Output("quiet")
        vgg = perceptual_loss("vgg", offline=offline, required=False)
        alex = perceptual_loss("alex", offline=offline, required=False)
        if alex is None or vgg is None:
            out.warn("LPIPS backbone weights are not cached (run `my3dgen fetch lpips-alexnet lpips-vgg16`); "
                     "using pixel losses instead")
        ident = None
        if config.sym and config.sym_loss == "id":
            ident = identity_network(offline=offline)
            if ident is None:
                instead = "LPIPS" if alex is not None else "pixel MSE"
                out.warn(f"ArcFace IR-SE50 is not cached (`my3dgen fetch arcface-ir-se50`); "
                         f"the symmetry term uses {instead} instead")
        return cls(vgg, alex, ident)

    def to(self, device: torch.device) -> LossNets:
        return LossNets(*(m.to(device) if m is not None else None
                          for m in (self.anchor_lpips, self.train_lpips, self.identity)))
