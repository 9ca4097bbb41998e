"""ArcFace IR-SE50: the face identity network of My3DGen's symmetry loss (and pSp's ID loss).

The standard 50-layer "IR-SE" ResNet of InsightFace as laid out in TreB1eN/InsightFace_Pytorch, with
its module names, so the released `model_ir_se50.pth` (zoo entry "arcface-ir-se50") loads strictly:

    input_layer   conv3x3 3->64, BN, PReLU                                     [N, 64, 112, 112]
    body.0..23    bottleneck_IR_SE units: 3 x 64, 4 x 128, 14 x 256, 3 x 512;
                  the first unit of each stage has stride 2                    [N, 512, 7, 7]
    output_layer  BN, Dropout, flatten, Linear 512*7*7 -> 512, BN1d           [N, 512]
    -> L2-normalized 512-d identity features.

Unit: res = BN, conv3x3, PReLU, conv3x3 (stride), BN, SE(reduction 16); shortcut = MaxPool(1, stride)
when the width stays, else conv1x1 (stride) + BN; out = res + shortcut.
Input: RGB in [-1, 1], 112 x 112, the face cropped as pSp does (see `identity_features`).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from my3dgen_cli.errors import ArtifactError, OfflineError
from my3dgen_cli.output import Output

ZOO_NAME = "arcface-ir-se50"
STAGES = ((64, 64, 3), (64, 128, 4), (128, 256, 14), (256, 512, 3))  # (in, depth, units) of IR-SE50


class Flatten(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0], -1)


class SEModule(nn.Module):
    """Squeeze-and-excitation with 1x1 convs (no bias): x * sigmoid(fc2(relu(fc1(avgpool(x)))))."""

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, channels // reduction, 1, bias=False)
        self.relu = nn.ReLU()
        self.fc2 = nn.Conv2d(channels // reduction, channels, 1, bias=False)
        self.sigmoid = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.sigmoid(self.fc2(self.relu(self.fc1(self.avg_pool(x)))))


class BottleneckIRSE(nn.Module):
    """TreB1eN's `bottleneck_IR_SE`."""

    def __init__(self, in_channel: int, depth: int, stride: int) -> None:
        super().__init__()
        if in_channel == depth:
            self.shortcut_layer: nn.Module = nn.MaxPool2d(1, stride)
        else:
            self.shortcut_layer = nn.Sequential(nn.Conv2d(in_channel, depth, 1, stride, bias=False),
                                                nn.BatchNorm2d(depth))
        self.res_layer = nn.Sequential(
            nn.BatchNorm2d(in_channel),
            nn.Conv2d(in_channel, depth, 3, 1, 1, bias=False),
            nn.PReLU(depth),
            nn.Conv2d(depth, depth, 3, stride, 1, bias=False),
            nn.BatchNorm2d(depth),
            SEModule(depth, 16),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.res_layer(x) + self.shortcut_layer(x)


class IRSE50(nn.Module):
    """TreB1eN's `Backbone(50, drop_ratio, mode="ir_se")`: [N, 3, 112, 112] in [-1, 1] -> [N, 512] unit vectors."""

    def __init__(self, drop_ratio: float = 0.6) -> None:
        super().__init__()
        self.input_layer = nn.Sequential(nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.PReLU(64))
        units = []
        for in_channel, depth, count in STAGES:
            units.append(BottleneckIRSE(in_channel, depth, 2))
            units += [BottleneckIRSE(depth, depth, 1) for _ in range(count - 1)]
        self.body = nn.Sequential(*units)
        self.output_layer = nn.Sequential(nn.BatchNorm2d(512), nn.Dropout(drop_ratio), Flatten(),
                                          nn.Linear(512 * 7 * 7, 512), nn.BatchNorm1d(512))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or tuple(x.shape[1:]) != (3, 112, 112):
            raise ValueError(f"IR-SE50 input: got shape {tuple(x.shape)}, expected (N, 3, 112, 112)")
        x = self.output_layer(self.body(self.input_layer(x)))
        return F.normalize(x, dim=1)


def identity_features(net: IRSE50, images: torch.Tensor) -> torch.Tensor:
    """Identity features of EG3D images [N, 3, H, W] in [-1, 1] (any H = W) -> [N, 512].

    As pSp's ID loss (which My3DGen uses): resize to 256, keep rows 35:223 and columns 32:220
    (the face without background), average-pool to 112.
    """
    if images.ndim != 4 or images.shape[1] != 3 or images.shape[2] != images.shape[3]:
        raise ValueError(f"images: got shape {tuple(images.shape)}, expected (N, 3, H, H)")
    if images.shape[-1] != 256:
        images = F.interpolate(images, size=(256, 256), mode="bilinear", align_corners=False, antialias=True)
    face = images[:, :, 35:223, 32:220]
    return net(F.adaptive_avg_pool2d(face, (112, 112)))


def load_state(net: IRSE50, state: dict[str, torch.Tensor]) -> IRSE50:
    """Load TreB1eN's state dict strictly by name and shape (`num_batches_tracked` may be absent)."""
    own = net.state_dict()
    for name, tensor in own.items():
        if name not in state:
            if name.endswith("num_batches_tracked"):
                continue
            raise ArtifactError(f"IR-SE50 weights lack {name}")
        if tuple(state[name].shape) != tuple(tensor.shape):
            raise ArtifactError(f"IR-SE50 weight {name}: got shape {tuple(state[name].shape)}, "
                                f"expected {tuple(tensor.shape)}")
    extra = sorted(set(state) - set(own))
    if extra:
        raise ArtifactError(f"IR-SE50 weights have an unexpected tensor {extra[0]}")
    net.load_state_dict(state, strict=False)
    return net


def build_arcface(path: str | Path | None = None) -> IRSE50:
    """IR-SE50 in eval mode with frozen weights: from `path` (model_ir_se50.pth), or random when None (tests)."""
    net = IRSE50()
    if path is not None:
        state = torch.load(path, map_location="cpu", weights_only=True)
        load_state(net, state)
    for p in net.parameters():
        p.requires_grad_(False)
    return net.eval()


def identity_network(offline: bool | None = None, output: Output | None = None) -> IRSE50 | None:
    """The verified pretrained IR-SE50 from the zoo, fetched first (visibly, on `output`) if need be;
    None only when it is not cached and the run is offline (callers warn with `offline_fallback`).
    A network or checksum failure raises, saying what to do."""
    from my3dgen_cli import zoo

    try:
        path = zoo.ensure(ZOO_NAME, offline=offline, display=zoo.Display(output))
    except OfflineError:
        return None
    return build_arcface(path)
