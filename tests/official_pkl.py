"""Write `.pkl` files shaped like official EG3D network pickles, for tests of the safe reader.

The structure follows NVlabs/eg3d: `training_loop.py` pickles
`dict(training_set_kwargs=..., G=..., D=..., G_ema=..., augment_pipe=...)` with plain `pickle.dump`,
after registering the buffer `dataset_label_std` (shape [c_dim]) on G, which G_ema inherits as a copy
(`layout="snapshot"`, the default). Networks saved again by hand are `layout="network"` (G_ema pickled
on its own) and `layout="g_ema_dict"` ({"G_ema": G_ema}, no D, no augment_pipe);
every `@persistent_class` module pickles (torch_utils/persistence.py) as
`_reconstruct_persistent_obj(meta)`, meta = dict(type='class', version=6, module_src=<source>,
class_name=<name>, state=<module __dict__>). Non-persistent modules (OSGDecoder, ImportanceRenderer,
MipRayMarcher2, RaySampler, torch.nn.Sequential / Softplus) pickle by reference to their class.
Tensors pickle the way plain `pickle.dump` pickles them (`torch._utils._rebuild_parameter`,
`_rebuild_tensor_v2`, `torch.storage._load_from_bytes`).

To make pickle name the official globals, throwaway modules `torch_utils.persistence`,
`dnnlib.util` and `training.*` are put into `sys.modules` only while pickling. Nothing here is a copy
of official code; the module tree is rebuilt from the flat official state-dict names.
"""

from __future__ import annotations

import contextlib
import pickle
import re
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

# Written into every module_src: if a reader ever executes it, the test notices.
DEFAULT_MODULE_SRC = "raise RuntimeError('module_src was executed: a safe reader never does this')\n"
BUFFER_NAMES = {"resample_filter", "noise_const", "w_avg"}


def _fake_module(name: str, **attrs: Any) -> types.ModuleType:
    module = types.ModuleType(name)
    for key, value in attrs.items():
        value.__module__ = name
        setattr(module, key, value)
    return module


def _reconstruct_persistent_obj(meta: Any) -> Any:  # pragma: no cover - only pickled by reference
    raise RuntimeError("never called: tests read these pickles with the safe reader only")


class EasyDict(dict):
    """Pickles as `dnnlib.util.EasyDict` (a dict subclass: NEWOBJ + SETITEMS)."""


class _Persistent(torch.nn.Module):
    """Pickles as the official persistent Decorator does."""

    _orig_class_name = "Module"
    _orig_module_src = DEFAULT_MODULE_SRC

    def __init__(self, *init_args: Any, **init_kwargs: Any) -> None:
        super().__init__()
        self._init_args = init_args
        self._init_kwargs = init_kwargs

    def __reduce__(self) -> tuple[Any, ...]:
        meta = dict(
            type="class",
            version=6,
            module_src=self._orig_module_src,
            class_name=self._orig_class_name,
            state=self.__getstate__(),
        )
        return (_reconstruct_persistent_obj, (meta,))


def _persistent_class(name: str, module_src: str) -> type[_Persistent]:
    return type(name, (_Persistent,), {"_orig_class_name": name, "_orig_module_src": module_src})


# Non-persistent official classes (pickled by module + name).
class OSGDecoder(torch.nn.Module):
    pass


class ImportanceRenderer(torch.nn.Module):
    pass


class MipRayMarcher2(torch.nn.Module):
    pass


class RaySampler(torch.nn.Module):
    pass


@contextlib.contextmanager
def _official_modules() -> Iterator[None]:
    """Register the fake official modules in sys.modules for the duration of a dump."""
    fakes = {
        "torch_utils": _fake_module("torch_utils"),
        "torch_utils.persistence": _fake_module(
            "torch_utils.persistence", _reconstruct_persistent_obj=_reconstruct_persistent_obj
        ),
        "dnnlib": _fake_module("dnnlib"),
        "dnnlib.util": _fake_module("dnnlib.util", EasyDict=EasyDict),
        "training": _fake_module("training"),
        "training.triplane": _fake_module("training.triplane", OSGDecoder=OSGDecoder),
        "training.volumetric_rendering": _fake_module("training.volumetric_rendering"),
        "training.volumetric_rendering.renderer": _fake_module(
            "training.volumetric_rendering.renderer", ImportanceRenderer=ImportanceRenderer
        ),
        "training.volumetric_rendering.ray_marcher": _fake_module(
            "training.volumetric_rendering.ray_marcher", MipRayMarcher2=MipRayMarcher2
        ),
        "training.volumetric_rendering.ray_sampler": _fake_module(
            "training.volumetric_rendering.ray_sampler", RaySampler=RaySampler
        ),
    }
    _reconstruct_persistent_obj.__qualname__ = "_reconstruct_persistent_obj"
    saved = {name: sys.modules.get(name) for name in fakes}
    sys.modules.update(fakes)
    try:
        yield
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


# Class of each module path in the official TriPlaneGenerator tree (triplane.py, networks_stylegan2.py,
# superresolution.py), as (class name, source file) or a non-persistent class.
_PATH_CLASSES: list[tuple[str, Any]] = [
    (r"backbone", ("Generator", "networks_stylegan2")),
    (r"backbone\.synthesis", ("SynthesisNetwork", "networks_stylegan2")),
    (r"backbone\.mapping", ("MappingNetwork", "networks_stylegan2")),
    (r".*\.(b\d+|block\d+)", ("SynthesisBlock", "networks_stylegan2")),
    (r".*\.conv[01]", ("SynthesisLayer", "networks_stylegan2")),
    (r".*\.torgb", ("ToRGBLayer", "networks_stylegan2")),
    (r".*\.skip", ("Conv2dLayer", "networks_stylegan2")),
    (r".*\.(affine|embed|fc\d+)|decoder\.net\.\d+", ("FullyConnectedLayer", "networks_stylegan2")),
    (r"superresolution", ("SuperresolutionHybrid8XDC", "superresolution")),
    (r"decoder", OSGDecoder),
    (r"decoder\.net", torch.nn.Sequential),
]


def _make_module(path: str, sources: dict[str, str]) -> torch.nn.Module:
    for pattern, spec in _PATH_CLASSES:
        if re.fullmatch(pattern, path):
            if isinstance(spec, tuple):
                name, src = spec
                return _persistent_class(name, sources[src])()
            return spec()
    raise ValueError(f"no official class known for module path {path!r}")


def build_module_tree(
    state_dict: dict[str, torch.Tensor],
    init_kwargs: dict[str, Any],
    rendering_kwargs: dict[str, Any],
    neural_rendering_resolution: int,
    module_src: str = DEFAULT_MODULE_SRC,
) -> torch.nn.Module:
    """A TriPlaneGenerator-shaped tree of pickling stand-ins holding `state_dict` (official names)."""
    sources = {"triplane": module_src, "networks_stylegan2": module_src, "superresolution": module_src}
    root = _persistent_class("TriPlaneGenerator", sources["triplane"])(
        **_init_kwargs_as_official(init_kwargs)
    )
    renderer = ImportanceRenderer()
    renderer.ray_marcher = MipRayMarcher2()
    renderer.plane_axes = torch.eye(3).repeat(3, 1, 1)  # a plain tensor attribute, not a buffer
    root.renderer = renderer
    ray_sampler = RaySampler()
    ray_sampler.ray_origins_h = ray_sampler.ray_directions = ray_sampler.depths = None
    root.ray_sampler = ray_sampler

    modules: dict[str, torch.nn.Module] = {"": root}
    for name, tensor in state_dict.items():
        prefix, _, leaf = name.rpartition(".")
        parts = prefix.split(".") if prefix else []
        for depth in range(1, len(parts) + 1):
            path = ".".join(parts[:depth])
            if path in modules:
                continue
            parent = modules[".".join(parts[: depth - 1])]
            if isinstance(parent, torch.nn.Sequential):  # decoder.net: Softplus sits between the FCs
                while len(parent) < int(parts[depth - 1]):
                    parent.add_module(str(len(parent)), torch.nn.Softplus())
            modules[path] = _make_module(path, sources)
            parent.add_module(parts[depth - 1], modules[path])
        owner = modules[prefix]
        if leaf in BUFFER_NAMES:
            owner.register_buffer(leaf, tensor.detach().clone())
        else:
            owner.register_parameter(leaf, torch.nn.Parameter(tensor.detach().clone(), requires_grad=False))
        if type(owner).__name__ == "FullyConnectedLayer" and leaf == "weight":
            # Plain attributes as FullyConnectedLayer keeps them; weight_gain is a numpy float64 there.
            owner.in_features, owner.out_features = int(tensor.shape[1]), int(tensor.shape[0])
            owner.activation = "linear"
            owner.weight_gain = np.float64(1.0 / np.sqrt(tensor.shape[1]))
            owner.bias_gain = 1.0

    root.z_dim = init_kwargs.get("z_dim")
    root.c_dim = init_kwargs.get("c_dim")
    root.w_dim = init_kwargs.get("w_dim")
    root.img_resolution = init_kwargs.get("img_resolution")
    root.img_channels = init_kwargs.get("img_channels")
    root.neural_rendering_resolution = neural_rendering_resolution
    root.rendering_kwargs = rendering_kwargs
    root._last_planes = None
    return root.eval().requires_grad_(False)


def _init_kwargs_as_official(init_kwargs: dict[str, Any]) -> dict[str, Any]:
    """A plain dict (the Decorator deep-copies **kwargs) whose mapping_kwargs and sr_kwargs are
    EasyDicts, as train.py builds them; rendering_kwargs stays a plain dict there."""
    out = dict(init_kwargs)
    for key in ("mapping_kwargs", "sr_kwargs"):
        if isinstance(out.get(key), dict):
            out[key] = EasyDict(out[key])
    return out


def _discriminator(module_src: str) -> torch.nn.Module:
    disc = _persistent_class("DualDiscriminator", module_src)(c_dim=25, img_resolution=512)
    disc.img_resolution = 512
    fc = _persistent_class("FullyConnectedLayer", module_src)(4, 1)
    fc.weight = torch.nn.Parameter(torch.randn(1, 4), requires_grad=False)
    fc.weight_gain = np.float64(0.5)
    disc.out = fc
    return disc


def _augment_pipe(module_src: str) -> torch.nn.Module:
    pipe = _persistent_class("AugmentPipe", module_src)(xflip=1, rotate90=1)
    pipe.register_buffer("p", torch.ones([]))
    pipe.xflip, pipe.imgfilter_bands = 1.0, [1, 1, 1, 1]
    return pipe


LAYOUTS = ("snapshot", "network", "g_ema_dict")


def write_official_pkl(
    path: str | Path,
    state_dict: dict[str, torch.Tensor],
    init_kwargs: dict[str, Any],
    rendering_kwargs: dict[str, Any],
    neural_rendering_resolution: int,
    extra_globals: dict[str, Any] | None = None,
    module_src: str = DEFAULT_MODULE_SRC,
    protocol: int | None = None,
    layout: str = "snapshot",
) -> Path:
    """Write an official-style network pickle whose G_ema holds `state_dict` (official names).

    layout: "snapshot" is what the training loop writes: G, D, G_ema, augment_pipe and
    training_set_kwargs, with `dataset_label_std` on G and G_ema. G has the same structure with
    all-zero tensors, so a test can tell which network was read. "network": G_ema (with its
    `dataset_label_std`) pickled on its own; "g_ema_dict": {"G_ema": G_ema} only.
    extra_globals: further top-level entries of a dict layout, pickled before the networks (e.g. an
    object whose `__reduce__` names `os.system`, to test refusals). protocol: pickle protocol (None =
    Python's default, as the official training loop used).
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout: got {layout!r}, expected one of {LAYOUTS}")
    g_ema = build_module_tree(
        state_dict, init_kwargs, rendering_kwargs, neural_rendering_resolution, module_src
    )
    label_std = torch.rand(int(init_kwargs.get("c_dim", 25)), generator=torch.Generator().manual_seed(5)) * 0.3
    g_ema.register_buffer("dataset_label_std", label_std.clone())
    data: Any
    if layout == "network":
        data = g_ema
    elif layout == "g_ema_dict":
        data = {**(extra_globals or {}), "G_ema": g_ema}
    else:
        zeros = {name: torch.zeros_like(t) for name, t in state_dict.items()}
        g = build_module_tree(zeros, init_kwargs, rendering_kwargs, neural_rendering_resolution, module_src)
        g.register_buffer("dataset_label_std", label_std.clone())
        data = dict(extra_globals or {})
        data["training_set_kwargs"] = dict(
            EasyDict(class_name="training.dataset.ImageFolderDataset", path="ffhq.zip", resolution=512)
        )
        data.update(G=g, D=_discriminator(module_src), G_ema=g_ema, augment_pipe=_augment_pipe(module_src))
    return _dump(path, data, protocol)


def write_discriminator_pkl(path: str | Path, module_src: str = DEFAULT_MODULE_SRC) -> Path:
    """A pickle of another network: the snapshot's D on its own (not a generator)."""
    return _dump(path, _discriminator(module_src), None)


def _dump(path: str | Path, data: Any, protocol: int | None) -> Path:
    path = Path(path)
    with _official_modules(), path.open("wb") as f:
        pickle.dump(data, f, protocol=protocol)
    return path
