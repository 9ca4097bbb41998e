"""GPU-only bugs caught on a CPU: device mixing and host syncs, seen at the dispatcher.

Two tools, used by tests/test_device_hygiene.py:

- `DeviceAudit`, a TorchDispatchMode for a model moved to PyTorch's `meta` device (shapes, no
  data). Every aten op is checked as CUDA would check it: all tensor arguments on one device,
  except 0-dim CPU tensors (CUDA kernels accept those as scalars). A tensor made on the CPU in a
  forward or a step (an arange or a zeros without device=, a module-level constant, a numpy round
  trip) meets the model's meta tensors in some op and raises `DeviceMixError`, naming the op and
  our source line. Reading a meta tensor on the host (.item(), float(), .tolist(), .cpu()) is
  recorded in `syncs` and answered with zeros so the code runs on; `forbid_syncs=True` raises
  `HostSyncError` instead. Ops whose output shape depends on the data (nonzero, masked_select,
  boolean indexing, unique) sync on CUDA too and count the same way. Ops on CPU tensors only
  (Adam's step counter) count only with `cpu_too=True`, which audits a plain CPU run.
- `fake_cuda`: the module's tensors as FakeTensors on "cuda:0" (no GPU needed: FakeTensorMode
  propagates devices and dtypes with meta kernels). It exercises the real `device.type == "cuda"`
  branches, such as CUDA autocast. Forward only: autograd's engine wants a real CUDA context.

Plain `meta` alone is not enough: some meta kernels (matmul) accept a CPU operand without complaint.
"""

from __future__ import annotations

import contextlib
import traceback
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

PACKAGE = Path(__file__).resolve().parents[1] / "my3dgen_cli"
aten = torch.ops.aten

# Ops that make a CUDA stream wait for the host: a value read, or an output shape read from the data.
SYNC_OPS = {
    aten._local_scalar_dense.default: "a host read of one value (.item(), float(), bool(), int(), .tolist())",
    aten.nonzero.default: "nonzero (data-dependent shape)",
    aten.masked_select.default: "masked_select (data-dependent shape)",
    aten.is_nonzero.default: "bool() of a tensor",
    aten.equal.default: "torch.equal (returns a Python bool)",
    aten._unique2.default: "unique (data-dependent shape)",
    aten.unique_consecutive.default: "unique_consecutive (data-dependent shape)",
    aten.unique_dim.default: "unique (data-dependent shape)",
    aten.repeat_interleave.Tensor: "repeat_interleave by a tensor (data-dependent shape)",
}


class DeviceMixError(RuntimeError):
    """An op got tensors on two devices (a CUDA run would stop here)."""


class HostSyncError(RuntimeError):
    """An op that makes the device wait for the host ran where none is allowed."""


def where_in_package() -> str:
    """The innermost my3dgen_cli source line on the stack: the line at fault."""
    for frame in reversed(traceback.extract_stack()):
        if str(PACKAGE) in frame.filename:
            return f"{Path(frame.filename).relative_to(PACKAGE.parent)}:{frame.lineno}: {frame.line}"
    return "(outside my3dgen_cli)"


def _tensors(args: tuple, kwargs: dict) -> list[torch.Tensor]:
    return [a for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)]


def _is_host_copy(func, tensors: list[torch.Tensor], kwargs: dict) -> bool:
    """A device -> host copy: .cpu(), .to("cpu"), .numpy() of a device tensor, or copy_ into a CPU tensor."""
    if func is aten._to_copy.default:
        target = kwargs.get("device")
        return target is not None and torch.device(target).type == "cpu" and tensors[0].device.type != "cpu"
    if func is aten.copy_.default:
        return tensors[0].device.type == "cpu" and tensors[1].device.type != "cpu"
    return False


def _bool_index(func, args: tuple) -> bool:
    """x[mask] / x[mask] = v: a boolean index becomes nonzero inside the kernel (a sync on CUDA)."""
    if func not in (aten.index.Tensor, aten.index_put_.default, aten.index_put.default):
        return False
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1] if i is not None)


class DeviceAudit(TorchDispatchMode):
    """Check every op for mixed devices; record (or forbid) host syncs. See the module docstring."""

    def __init__(self, forbid_syncs: bool = False, cpu_too: bool = False) -> None:
        super().__init__()
        self.forbid_syncs, self.cpu_too = forbid_syncs, cpu_too
        self.syncs: list[str] = []  # "what: where" for each sync seen

    def _sync(self, what: str) -> None:
        note = f"{what} at {where_in_package()}"
        if self.forbid_syncs:
            raise HostSyncError(note)
        self.syncs.append(note)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = _tensors(args, kwargs)
        devices = {t.device for t in tensors if not (t.device.type == "cpu" and t.ndim == 0)}
        if len(devices) > 1 and func not in (aten._to_copy.default, aten.copy_.default):  # copies may cross
            names = ", ".join(sorted(str(d) for d in devices))
            raise DeviceMixError(f"{func} mixes devices {names} at {where_in_package()}")
        on_device = self.cpu_too or any(t.device.type != "cpu" for t in tensors)
        if func in SYNC_OPS and on_device:  # a CPU value read (Adam's step count) waits for no device
            self._sync(SYNC_OPS[func])
            if tensors and tensors[0].device.type == "meta" and func is aten._local_scalar_dense.default:
                return False if tensors[0].dtype == torch.bool else 0 if not tensors[0].is_floating_point() else 0.0
        elif on_device and _bool_index(func, args):
            self._sync("boolean-mask indexing (data-dependent shape)")
        elif _is_host_copy(func, tensors, kwargs):
            self._sync("a device -> host copy (.cpu(), .to('cpu'), .tolist(), .numpy())")
            if tensors[-1].device.type == "meta":  # no data to copy: the host gets zeros
                if func is aten.copy_.default:
                    return tensors[0].zero_()
                src = tensors[0]
                return torch.zeros(src.shape, dtype=kwargs.get("dtype") or src.dtype, device="cpu")
        return func(*args, **kwargs)


def to_meta(module: nn.Module) -> nn.Module:
    """The module's parameters and buffers on the meta device (what `module.to(device)` moves)."""
    return module.to("meta")


@contextlib.contextmanager
def fake_cuda(*modules: nn.Module) -> Iterator[torch.device]:
    """Inside: `modules`' parameters and buffers are FakeTensors on cuda:0, and new tensors are fake.

    Parameters and buffers are swapped one by one (Module.to cannot swap a real tensor for a fake
    one); like `.to("cuda")`, plain tensor attributes stay where they are. The modules' real
    tensors come back on exit.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = FakeTensorMode(allow_non_fake_inputs=True)  # real CPU tensors met inside become fake CPU tensors
    saved: list[tuple[dict, str, torch.Tensor]] = []
    device = torch.device("cuda", 0)
    with mode:
        for module in modules:
            for m in module.modules():
                for slots in (m._parameters, m._buffers):
                    for name, t in list(slots.items()):
                        if t is None:
                            continue
                        saved.append((slots, name, t))
                        with torch.no_grad():  # no autograd node: a fake CUDA one would ask for a real stream
                            fake = mode.from_tensor(t.detach()).to(device)
                        slots[name] = nn.Parameter(fake, t.requires_grad) if isinstance(t, nn.Parameter) else fake
        try:
            yield device
        finally:
            for slots, name, t in saved:
                slots[name] = t
