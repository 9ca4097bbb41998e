"""MTCNN face detection (Zhang et al. 2016) in plain PyTorch: face boxes + 5 landmarks.

The three cascaded networks (P-Net proposals over an image pyramid, R-Net refinement, O-Net
refinement + landmarks) load the weights that ship inside the `mtcnn` wheel (MIT licence) as
joblib+lz4 lists of numpy arrays in Keras layout (conv kernels HWIO, PReLU alphas (1, 1, C),
dense (in, out)). Only those files are read; the package's TensorFlow code is never imported.
Each file is checked against its sha256 before it is unpickled.

Coordinates are continuous pixel coordinates: pixel (i, j) covers [j, j+1) x [i, i+1), so its
centre is (j + 0.5, i + 0.5) and the left-right mirror of x in an image of width W is W - x.
Landmark order: left eye, right eye, nose, left mouth corner, right mouth corner, where "left"
means the image's left (the subject's right eye).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def load_weights(name: str) -> list[np.ndarray]:
    """The numpy arrays of one network ("pnet", "rnet" or "onet").

    The zoo resolves `mtcnn-<name>` (a file inside the installed `mtcnn` wheel, `package://` URL) and
    verifies its sha256 before we unpickle it with joblib; the package's TensorFlow code never runs.
    """
    from my3dgen_cli import zoo

    path = zoo.ensure(f"mtcnn-{name}")
    import joblib  # unpickles: only after the zoo verified the checksum

    return [np.asarray(a, dtype=np.float32) for a in joblib.load(path)]


def _max_pool_same(x: torch.Tensor, k: int, s: int) -> torch.Tensor:
    """Keras MaxPooling2D(padding="same"): TensorFlow's padding, extra row/column at the end."""
    pads = []
    for n in (x.shape[-1], x.shape[-2]):
        total = max((math.ceil(n / s) - 1) * s + k - n, 0)
        pads += [total // 2, total - total // 2]
    return F.max_pool2d(F.pad(x, pads, value=-math.inf), k, s)


def _flatten_keras(x: torch.Tensor) -> torch.Tensor:
    """Keras Permute((2, 1, 3)) + Flatten: (N, C, H, W) -> (N, W*H*C) in W, H, C order."""
    return x.permute(0, 3, 2, 1).reshape(x.shape[0], -1)


class _Net(nn.Module):
    """Holds layers in Keras weight order; `load` fills them from the array list."""

    def load(self, arrays: list[np.ndarray]) -> None:
        it = iter(arrays)
        for layer in self.children():
            if isinstance(layer, nn.Conv2d):
                layer.weight.data = torch.from_numpy(next(it).transpose(3, 2, 0, 1).copy())  # HWIO -> OIHW
                layer.bias.data = torch.from_numpy(next(it))
            elif isinstance(layer, nn.Linear):
                layer.weight.data = torch.from_numpy(next(it).T.copy())  # (in, out) -> (out, in)
                layer.bias.data = torch.from_numpy(next(it))
            elif isinstance(layer, nn.PReLU):
                layer.weight.data = torch.from_numpy(next(it).reshape(-1))
        if next(it, None) is not None:
            raise ValueError(f"{type(self).__name__}: more weight arrays than layers")


class PNet(_Net):
    """Proposal net, fully convolutional: (N, 3, H, W) -> box offsets (N, 4, h, w), face prob (N, h, w)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.prelu1 = nn.Conv2d(3, 10, 3), nn.PReLU(10)
        self.conv2, self.prelu2 = nn.Conv2d(10, 16, 3), nn.PReLU(16)
        self.conv3, self.prelu3 = nn.Conv2d(16, 32, 3), nn.PReLU(32)
        self.conv4_1, self.conv4_2 = nn.Conv2d(32, 4, 1), nn.Conv2d(32, 2, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = _max_pool_same(self.prelu1(self.conv1(x)), 2, 2)
        x = self.prelu3(self.conv3(self.prelu2(self.conv2(x))))
        return self.conv4_1(x), self.conv4_2(x).softmax(dim=1)[:, 1]


class RNet(_Net):
    """Refine net: (N, 3, 24, 24) -> box offsets (N, 4), face prob (N,)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.prelu1 = nn.Conv2d(3, 28, 3), nn.PReLU(28)
        self.conv2, self.prelu2 = nn.Conv2d(28, 48, 3), nn.PReLU(48)
        self.conv3, self.prelu3 = nn.Conv2d(48, 64, 2), nn.PReLU(64)
        self.fc4, self.prelu4 = nn.Linear(576, 128), nn.PReLU(128)
        self.fc5_1, self.fc5_2 = nn.Linear(128, 4), nn.Linear(128, 2)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = _max_pool_same(self.prelu1(self.conv1(x)), 3, 2)
        x = F.max_pool2d(self.prelu2(self.conv2(x)), 3, 2)  # padding "valid"
        x = self.prelu4(self.fc4(_flatten_keras(self.prelu3(self.conv3(x)))))
        return self.fc5_1(x), self.fc5_2(x).softmax(dim=1)[:, 1]


class ONet(_Net):
    """Output net: (N, 3, 48, 48) -> box offsets (N, 4), landmarks (N, 10: 5 x then 5 y), prob (N,)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.prelu1 = nn.Conv2d(3, 32, 3), nn.PReLU(32)
        self.conv2, self.prelu2 = nn.Conv2d(32, 64, 3), nn.PReLU(64)
        self.conv3, self.prelu3 = nn.Conv2d(64, 64, 3), nn.PReLU(64)
        self.conv4, self.prelu4 = nn.Conv2d(64, 128, 2), nn.PReLU(128)
        self.fc5, self.prelu5 = nn.Linear(1152, 256), nn.PReLU(256)
        self.fc6_1, self.fc6_2, self.fc6_3 = nn.Linear(256, 4), nn.Linear(256, 10), nn.Linear(256, 2)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = _max_pool_same(self.prelu1(self.conv1(x)), 3, 2)
        x = F.max_pool2d(self.prelu2(self.conv2(x)), 3, 2)  # padding "valid"
        x = _max_pool_same(self.prelu3(self.conv3(x)), 2, 2)
        x = self.prelu5(self.fc5(_flatten_keras(self.prelu4(self.conv4(x)))))
        return self.fc6_1(x), self.fc6_2(x), self.fc6_3(x).softmax(dim=1)[:, 1]


@dataclass(frozen=True)
class Detection:
    """One face. box: (4,) x1, y1, x2, y2; landmarks: (5, 2) x, y; continuous pixel coordinates."""

    box: np.ndarray
    score: float
    landmarks: np.ndarray

    @property
    def size(self) -> float:
        """Mean side of the box in pixels."""
        return float((self.box[2] - self.box[0] + self.box[3] - self.box[1]) / 2)


def nms(boxes: np.ndarray, scores: np.ndarray, threshold: float, mode: str = "union") -> np.ndarray:
    """Greedy non-maximum suppression. boxes (N, 4), scores (N,) -> kept indices, best first.

    mode "union": overlap = intersection / union; "min": intersection / smaller area.
    """
    order = np.argsort(-scores, kind="stable")
    area = np.maximum(boxes[:, 2] - boxes[:, 0], 0) * np.maximum(boxes[:, 3] - boxes[:, 1], 0)
    keep = []
    while order.size:
        i, rest = order[0], order[1:]
        keep.append(i)
        w = np.maximum(0, np.minimum(boxes[i, 2], boxes[rest, 2]) - np.maximum(boxes[i, 0], boxes[rest, 0]))
        h = np.maximum(0, np.minimum(boxes[i, 3], boxes[rest, 3]) - np.maximum(boxes[i, 1], boxes[rest, 1]))
        inter = w * h
        denom = area[i] + area[rest] - inter if mode == "union" else np.minimum(area[i], area[rest])
        order = rest[inter / np.maximum(denom, 1e-12) <= threshold]
    return np.asarray(keep, dtype=np.int64)


def _square(boxes: np.ndarray) -> np.ndarray:
    """Grow each box to a square around its centre. (N, 4) -> (N, 4)."""
    c = (boxes[:, :2] + boxes[:, 2:]) / 2
    half = np.maximum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])[:, None] / 2
    return np.concatenate([c - half, c + half], axis=1)


def _patches(image: torch.Tensor, boxes: np.ndarray, size: int) -> torch.Tensor:
    """Bilinear samples of each box at size x size pixel centres; zeros (mid grey) outside.

    image: (1, 3, H, W) normalized; boxes: (N, 4) continuous coordinates -> (N, 3, size, size).
    """
    h, w = image.shape[-2:]
    t = (torch.arange(size, dtype=torch.float32) + 0.5) / size  # (size,)
    b = torch.from_numpy(boxes.astype(np.float32))
    xs = b[:, 0:1] + t[None] * (b[:, 2:3] - b[:, 0:1])  # (N, size), continuous x
    ys = b[:, 1:2] + t[None] * (b[:, 3:4] - b[:, 1:2])
    gx = (2 * xs / w - 1)[:, None, :].expand(-1, size, -1)  # align_corners=False convention
    gy = (2 * ys / h - 1)[:, :, None].expand(-1, -1, size)
    grid = torch.stack([gx, gy], dim=-1)  # (N, size, size, 2)
    return F.grid_sample(image.expand(len(boxes), -1, -1, -1), grid, mode="bilinear", align_corners=False)


class FaceDetector:
    """MTCNN with the reference thresholds: P 0.6, R 0.7, O 0.8; pyramid factor 0.709.

    `detect(image)` takes an (H, W, 3) uint8 RGB array and returns detections, largest first.
    """

    def __init__(
        self,
        min_face_size: float = 20.0,
        thresholds: tuple[float, float, float] = (0.6, 0.7, 0.8),
        scale_factor: float = 0.709,
    ) -> None:
        self.min_face_size = min_face_size
        self.thresholds = thresholds
        self.scale_factor = scale_factor
        self.pnet, self.rnet, self.onet = PNet(), RNet(), ONet()
        for name, net in (("pnet", self.pnet), ("rnet", self.rnet), ("onet", self.onet)):
            net.load(load_weights(name))
            net.eval().requires_grad_(False)

    def _proposals(self, image: torch.Tensor) -> np.ndarray:
        """P-Net over the pyramid -> (N, 5) boxes + scores, regression applied, squared."""
        h, w = image.shape[-2:]
        scale = 12.0 / self.min_face_size
        found = []
        while min(h, w) * scale >= 12:
            sh, sw = max(int(math.ceil(h * scale)), 12), max(int(math.ceil(w * scale)), 12)
            scaled = F.interpolate(image, size=(sh, sw), mode="bilinear", antialias=True, align_corners=False)
            reg, prob = self.pnet(scaled)
            iy, ix = np.nonzero(prob[0].numpy() > self.thresholds[0])
            if iy.size:
                cell = np.stack([2 * ix, 2 * iy, 2 * ix + 12, 2 * iy + 12], axis=1).astype(np.float64)
                offsets = reg[0].numpy()[:, iy, ix].T.astype(np.float64)  # (n, 4), in cell sizes
                boxes = (cell + 12.0 * offsets) / np.array([sw / w, sh / h, sw / w, sh / h])
                scores = prob[0].numpy()[iy, ix].astype(np.float64)
                keep = nms(boxes, scores, 0.5)
                found.append(np.concatenate([boxes[keep], scores[keep, None]], axis=1))
            scale *= self.scale_factor
        if not found:
            return np.zeros((0, 5))
        cand = np.concatenate(found)
        cand = cand[nms(cand[:, :4], cand[:, 4], 0.7)]
        return np.concatenate([_square(cand[:, :4]), cand[:, 4:]], axis=1)

    @torch.inference_mode()
    def detect(self, image: np.ndarray) -> list[Detection]:
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"image: got {image.dtype} {image.shape}, expected uint8 (H, W, 3)")
        x = (torch.tensor(image).permute(2, 0, 1)[None].float() - 127.5) / 128.0  # (1, 3, H, W), a copy
        boxes = self._proposals(x)
        if not len(boxes):
            return []
        reg, prob = self.rnet(_patches(x, boxes[:, :4], 24))
        keep = prob.numpy() > self.thresholds[1]
        boxes, reg, prob = boxes[keep], reg.numpy()[keep], prob.numpy()[keep]
        if not len(boxes):
            return []
        wh = boxes[:, 2:4] - boxes[:, 0:2]  # (N, 2)
        boxes = boxes[:, :4] + reg.astype(np.float64) * np.concatenate([wh, wh], axis=1)
        boxes = boxes[nms(boxes, prob, 0.7)] if len(boxes) else boxes
        boxes = _square(boxes)
        reg, marks, prob = (t.numpy().astype(np.float64) for t in self.onet(_patches(x, boxes, 48)))
        keep = prob > self.thresholds[2]
        boxes, reg, marks, prob = boxes[keep], reg[keep], marks[keep], prob[keep]
        wh = boxes[:, 2:4] - boxes[:, 0:2]  # (N, 2)
        lm = np.stack([marks[:, :5], marks[:, 5:]], axis=-1) * wh[:, None] + boxes[:, None, :2]  # (N, 5, 2)
        boxes = boxes + reg * np.concatenate([wh, wh], axis=1)
        order = nms(boxes, prob, 0.7, mode="min")
        dets = [Detection(boxes[i], float(prob[i]), lm[i]) for i in order]
        return sorted(dets, key=lambda d: -d.size)


@lru_cache(maxsize=1)
def default_detector() -> FaceDetector:
    """One shared detector per process (loading and verifying the weights takes ~0.1 s).

    Its many small convolutions run on the cores this process may use, no more (speed.use_all_cores).
    """
    from my3dgen_cli.speed import use_all_cores

    use_all_cores()
    return FaceDetector()
