"""Generator configurations: the official init/rendering kwargs, typed and validated once.

A config is stored as the dict layout of the official pickle (and of shared/eg3d_parity/
config.json): {"init_kwargs": {...}, "rendering_kwargs": {...}, "neural_rendering_resolution": n}.
`GeneratorConfig.from_dict` reads that layout; `to_dict` writes it back unchanged, so converted
checkpoints round-trip. my3dgen adds two optional init kwargs that the official code does not
know, for the small `tiny` config: `backbone_resolution` (official: 256) and `plane_channels`
(official: 32).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any

from my3dgen_cli.eg3d.superres import SR_SPECS, SRSpec
from my3dgen_cli.errors import shown

FFHQ_RENDERING: dict[str, Any] = {
    "image_resolution": 512,
    "disparity_space_sampling": False,
    "clamp_mode": "softplus",
    "superresolution_module": "training.superresolution.SuperresolutionHybrid8XDC",
    "c_gen_conditioning_zero": False,
    "gpc_reg_prob": 0.5,
    "c_scale": 1.0,
    "superresolution_noise_mode": "none",
    "density_reg": 0.25,
    "density_reg_p_dist": 0.004,
    "reg_type": "l1",
    "decoder_lr_mul": 1.0,
    "sr_antialias": True,
    "depth_resolution": 48,
    "depth_resolution_importance": 48,
    "ray_start": 2.25,
    "ray_end": 3.3,
    "box_warp": 1,
    "avg_camera_radius": 2.7,
    "avg_camera_pivot": [0, 0, 0.2],
}

FFHQ_INIT: dict[str, Any] = {
    "z_dim": 512,
    "w_dim": 512,
    "mapping_kwargs": {"num_layers": 2},
    "channel_base": 32768,
    "channel_max": 512,
    "fused_modconv_default": "inference_only",
    "num_fp16_res": 0,
    "conv_clamp": None,
    "sr_num_fp16_res": 4,
    "sr_kwargs": {"channel_base": 32768, "channel_max": 512, "fused_modconv_default": "inference_only"},
    "c_dim": 25,
    "img_resolution": 512,
    "img_channels": 3,
}

CLASS_NAME = "training.triplane.TriPlaneGenerator"


def _official(nrr: int, pivot: list[float] | None = None) -> dict[str, Any]:
    init = copy.deepcopy(FFHQ_INIT)
    rendering = copy.deepcopy(FFHQ_RENDERING)
    if pivot is not None:
        rendering["avg_camera_pivot"] = pivot
    init["rendering_kwargs"] = rendering
    return {"init_kwargs": init, "rendering_kwargs": rendering, "neural_rendering_resolution": nrr,
            "class_name": CLASS_NAME}


def _tiny() -> dict[str, Any]:
    init = copy.deepcopy(FFHQ_INIT)
    init.update(z_dim=64, w_dim=64, channel_base=256, channel_max=32, img_resolution=64,
                backbone_resolution=32, plane_channels=16)
    rendering = copy.deepcopy(FFHQ_RENDERING)
    rendering.update(image_resolution=64, superresolution_module="my3dgen.superresolution.Tiny2X",
                     depth_resolution=12, depth_resolution_importance=12)
    init["rendering_kwargs"] = rendering
    return {"init_kwargs": init, "rendering_kwargs": rendering, "neural_rendering_resolution": 32,
            "class_name": CLASS_NAME}


NAMED_CONFIGS = {
    "ffhq512-128": lambda: _official(128),
    "ffhqrebalanced512-128": lambda: _official(128),
    "ffhqrebalanced512-64": lambda: _official(64),
    "afhqcats512-128": lambda: _official(128, pivot=[0, 0, -0.06]),
    "tiny": _tiny,
}

_REQUIRED_RENDERING = ("depth_resolution", "depth_resolution_importance", "ray_start", "ray_end", "box_warp",
                       "superresolution_module", "sr_antialias", "superresolution_noise_mode",
                       "c_gen_conditioning_zero", "clamp_mode", "avg_camera_pivot", "avg_camera_radius")


# Bounds on what a config read from a file may ask for, checked before anything is allocated: the
# official values sit well inside them (channel_base 32768, resolutions up to 512, 48 depth samples).
_INT_BOUNDS: dict[str, tuple[int, int]] = {
    "z_dim": (1, 4096), "w_dim": (1, 4096), "c_dim": (0, 1024), "img_resolution": (4, 4096),
    "channel_base": (1, 1 << 20), "channel_max": (1, 4096), "mapping_layers": (1, 64),
    "sr_num_fp16_res": (0, 16), "backbone_resolution": (4, 2048), "plane_channels": (1, 1024),
    "neural_rendering_resolution": (1, 1024),
}
MAX_DEPTH_SAMPLES = 1024  # per ray and pass; the official configs take 48
_RENDERING_INT_BOUNDS = {"depth_resolution": (1, MAX_DEPTH_SAMPLES),
                         "depth_resolution_importance": (0, MAX_DEPTH_SAMPLES), "image_resolution": (4, 4096)}
_POWER_OF_TWO = ("img_resolution", "backbone_resolution")


def _check_int(where: str, value: Any, low: int, high: int) -> int:
    """`value` as an int in [low, high], else a ValueError naming `where` (bools and floats refused)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{where}: got {shown(value)}, expected an integer")
    if not low <= value <= high:
        raise ValueError(f"{where}: got {value}, expected {low} to {high}")
    return value


def _check_number(where: str, value: Any, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{where}: got {shown(value)}, expected a finite number")
    if positive and value <= 0:
        raise ValueError(f"{where}: got {value}, expected a positive number")
    return float(value)


@dataclass(frozen=True)
class GeneratorConfig:
    """Typed view of an EG3D generator's configuration (validated in __post_init__)."""

    z_dim: int
    w_dim: int
    c_dim: int
    img_resolution: int
    channel_base: int
    channel_max: int
    mapping_layers: int
    conv_clamp: float | None
    sr_num_fp16_res: int
    backbone_resolution: int
    plane_channels: int
    neural_rendering_resolution: int
    rendering: dict[str, Any]
    raw: dict[str, Any] = field(repr=False, compare=False)

    def __post_init__(self) -> None:
        for key, (low, high) in _INT_BOUNDS.items():
            _check_int(key, getattr(self, key), low, high)
        for key in _POWER_OF_TWO:
            value = getattr(self, key)
            if value & (value - 1):
                raise ValueError(f"{key}: got {value}, expected a power of two")
        if self.conv_clamp is not None:
            _check_number("conv_clamp", self.conv_clamp, positive=True)
        self._check_rendering()

    def _check_rendering(self) -> None:
        for key in _REQUIRED_RENDERING:
            if key not in self.rendering:
                # The official code reads these through .get() defaults; a silent default changes the image.
                raise ValueError(f"rendering_kwargs: missing {key!r}")
        if self.rendering["superresolution_module"] not in SR_SPECS:
            raise ValueError(f"rendering_kwargs.superresolution_module: got "
                             f"{self.rendering['superresolution_module']!r}, expected one of {sorted(SR_SPECS)}")
        if self.rendering["clamp_mode"] != "softplus":
            raise ValueError(f"rendering_kwargs.clamp_mode: got {self.rendering['clamp_mode']!r}, expected 'softplus'")
        if self.rendering.get("disparity_space_sampling", False):
            raise ValueError("rendering_kwargs.disparity_space_sampling: got True, expected False")
        for key, (low, high) in _RENDERING_INT_BOUNDS.items():
            if key in self.rendering:
                _check_int(f"rendering_kwargs.{key}", self.rendering[key], low, high)
        start = _check_number("rendering_kwargs.ray_start", self.rendering["ray_start"], positive=True)
        end = _check_number("rendering_kwargs.ray_end", self.rendering["ray_end"], positive=True)
        if end <= start:
            raise ValueError(f"rendering_kwargs.ray_end: got {end}, expected more than ray_start {start}")
        for key in ("box_warp", "avg_camera_radius"):
            _check_number(f"rendering_kwargs.{key}", self.rendering[key], positive=True)
        pivot = self.rendering["avg_camera_pivot"]
        if not isinstance(pivot, (list, tuple)) or len(pivot) != 3:
            raise ValueError(f"rendering_kwargs.avg_camera_pivot: got {shown(pivot)}, expected 3 numbers")
        for i, v in enumerate(pivot):
            _check_number(f"rendering_kwargs.avg_camera_pivot[{i}]", v)
        if not isinstance(self.rendering["superresolution_module"], str):
            raise ValueError(f"rendering_kwargs.superresolution_module: got "
                             f"{shown(self.rendering['superresolution_module'])}, expected a string")
        if self.sr_spec.output_resolution != self.img_resolution:
            raise ValueError(f"img_resolution: got {self.img_resolution}, expected "
                             f"{self.sr_spec.output_resolution} for {self.rendering['superresolution_module']}")
        if self.neural_rendering_resolution < 1:
            raise ValueError(f"neural_rendering_resolution: got {self.neural_rendering_resolution}, expected >= 1")

    @property
    def sr_spec(self) -> SRSpec:
        return SR_SPECS[self.rendering["superresolution_module"]]

    @property
    def sr_conv_clamp(self) -> float | None:
        return 256.0 if self.sr_num_fp16_res > 0 else None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GeneratorConfig:
        """Read {"init_kwargs", "rendering_kwargs", "neural_rendering_resolution"?}."""
        if not isinstance(data, dict) or not isinstance(data.get("init_kwargs"), dict):
            raise ValueError("generator config: missing 'init_kwargs' (a dict)")
        init = data["init_kwargs"]
        rendering = data.get("rendering_kwargs") or init.get("rendering_kwargs")
        if not rendering or not isinstance(rendering, dict):
            raise ValueError("generator config: missing 'rendering_kwargs' (a dict)")
        mapping = init.get("mapping_kwargs", {})
        if not isinstance(mapping, dict):
            raise ValueError(f"init_kwargs.mapping_kwargs: got {shown(mapping)}, expected a dict")
        for key in ("z_dim", "w_dim", "c_dim", "img_resolution"):
            if key not in init:
                raise ValueError(f"init_kwargs: missing {key!r}")
        sr_kwargs = init.get("sr_kwargs", {})
        if not isinstance(sr_kwargs, dict):
            raise ValueError(f"init_kwargs.sr_kwargs: got {shown(sr_kwargs)}, expected a dict")
        for key in ("channel_base", "channel_max"):  # the superresolution network's own channel counts
            if key in sr_kwargs:
                _check_int(f"init_kwargs.sr_kwargs.{key}", sr_kwargs[key], *_INT_BOUNDS[key])
        return cls(
            z_dim=init["z_dim"], w_dim=init["w_dim"], c_dim=init["c_dim"],
            img_resolution=init["img_resolution"],
            channel_base=init.get("channel_base", 32768), channel_max=init.get("channel_max", 512),
            mapping_layers=mapping.get("num_layers", 2),
            conv_clamp=init.get("conv_clamp"), sr_num_fp16_res=init.get("sr_num_fp16_res", 0),
            backbone_resolution=init.get("backbone_resolution", 256),
            plane_channels=init.get("plane_channels", 32),
            neural_rendering_resolution=data.get("neural_rendering_resolution", 64),
            rendering=dict(rendering), raw=copy.deepcopy(dict(data)),
        )

    def to_dict(self) -> dict[str, Any]:
        out = copy.deepcopy(self.raw)
        out["neural_rendering_resolution"] = self.neural_rendering_resolution
        out.setdefault("rendering_kwargs", copy.deepcopy(self.rendering))
        out.setdefault("class_name", CLASS_NAME)
        return out


def resolve_config(config: str | dict[str, Any] | GeneratorConfig) -> GeneratorConfig:
    """A named config ("ffhq512-128", "tiny", ...), a config dict, or a GeneratorConfig."""
    if isinstance(config, GeneratorConfig):
        return config
    if isinstance(config, str):
        if config not in NAMED_CONFIGS:
            raise ValueError(f"config: got {config!r}, expected one of {sorted(NAMED_CONFIGS)}")
        return GeneratorConfig.from_dict(NAMED_CONFIGS[config]())
    return GeneratorConfig.from_dict(config)
