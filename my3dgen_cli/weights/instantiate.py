"""A generator whose tensors are the checkpoint's, built without a random initialisation.

`build_generator` draws ~30 M random numbers that loading a checkpoint overwrites at once, then
`load_state_dict` copies every weight a second time: most of the time an open took (see
docs/benchmarks.md). Here, as huggingface's `no_init_weights` does, the module tree is built with
its random initialisation skipped (`layers.skip_random_init`: uninitialised memory, never read),
and the checkpoint's tensors are assigned to it (`load_state_dict(..., assign=True)`), each cast
to the dtype the module declares (fp16 storage becomes fp32 parameters, exactly as the copy did)
and made contiguous with memory of its own.

Why not timm's `meta` device: in this torch, the first arithmetic on a meta tensor (the
constructors divide and build filters) imports torch._dynamo, ~1.5 s in a fresh process: more
than the whole open. Skipping only the random draws keeps every other tensor the constructors
compute (filters, zeros, any non-persistent buffer) exactly as a normal build has it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def skeleton(config: Any) -> nn.Module:
    """The generator of `config` (eval mode) with its random weights left uninitialised."""
    from my3dgen_cli.eg3d import build_generator  # lazy: the generator package imports this module
    from my3dgen_cli.eg3d.layers import skip_random_init

    with skip_random_init():
        return build_generator(config)


def assign_state(generator: nn.Module, state_dict: dict[str, torch.Tensor]) -> nn.Module:
    """Make the tensors of `state_dict` those of `generator` (from `skeleton`); eval mode.

    state_dict: official names -> tensors whose names and shapes were checked
    (`checkpoint.check_state_dict`); every parameter and persistent buffer must be there (strict).
    Tensors already in the module's dtype are used as they are: the memory-mapped tensors of a
    safetensors file stay mapped, read on first use, never written back (a private mapping).
    """
    dtypes = {name: t.dtype for name, t in generator.state_dict().items()}
    generator.load_state_dict(own_tensors(state_dict, dtypes), strict=True, assign=True)
    return generator.eval()


def own_tensors(state_dict: dict[str, torch.Tensor], dtypes: dict[str, torch.dtype]) -> dict[str, torch.Tensor]:
    """Each tensor in its module's dtype, contiguous and with storage no other tensor shares.

    Assigned tensors become the parameters: two parameters viewing one storage (possible in a
    pickle) would change together in `merge_adapters`, and odd strides could pick other kernels
    than the contiguous parameters a copy made.
    """
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, t in state_dict.items():
        t = t.detach().to(dtype=dtypes.get(name, t.dtype)).contiguous()
        storage = t.untyped_storage()
        if storage.data_ptr() in seen or storage.nbytes() != t.numel() * t.element_size():
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        out[name] = t
    return out
