"""Fast paths for rendering and training, each beside the exact fp32 eager path it replaces.

    with autocast(device, "bf16"):            # mixed precision (no-op for "off")
        out = G.synthesis(ws, c)
    synth = compiled(G.synthesis)             # torch.compile, built once per callable
    with activation_checkpointing(G):         # recompute block activations in backward
        loss.backward()

Exactness (tests/test_scale_speed.py measures each on the tiny config, CPU):
- "off" / no compile / no checkpointing: the reference.
- activation checkpointing: the same math re-run in backward; gradients equal to ~1e-6.
- torch.compile: same ops, fused kernels; images equal to ~1e-5.
- channels_last: NHWC memory for the backbone and superresolution convolutions; same values, float
  order only (~1e-6). On by default with CUDA autocast (tensor-core kernels are NHWC), and for a
  full-size render on a CPU whose convolutions measured faster in NHWC (cpu_layout.py); off otherwise.
- bf16 autocast: 8-bit mantissa in convolutions and matmuls; images differ by a few 1e-2 in [-1, 1].
  fp16 on CUDA is the official superresolution's precision (EG3D runs its SR blocks in fp16); training
  pairs it with a GradScaler (training.py), since fp16 flushes the small gradients of a 512 px loss.
All default off (channels_last: see `use_channels_last`). Device and dtype come from the tensors;
nothing here names a device.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import os
import threading
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from my3dgen_cli.errors import UserInputError

T = TypeVar("T")

AMP_MODES = ("off", "bf16", "fp16")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def check_amp(amp: str | bool) -> str:
    """Normalize an --amp value: True = "bf16" (no gradient scaler needed), False = "off"."""
    if amp is True:
        return "bf16"
    if amp is False or amp is None:
        return "off"
    if amp not in AMP_MODES:
        raise ValueError(f"amp: got {amp!r}, expected one of {', '.join(AMP_MODES)}")
    return amp


def autocast(device: torch.device, amp: str | bool) -> contextlib.AbstractContextManager:
    """torch.autocast for `device` in the chosen precision; a null context for "off".

    fp16 is offered on CUDA only (CPU fp16 kernels are slow or missing); bf16 runs on CUDA and CPU.
    """
    mode = check_amp(amp)
    if mode == "off":
        return contextlib.nullcontext()
    if mode == "fp16" and device.type != "cuda":
        raise UserInputError(f"amp: got 'fp16' on {device.type}, expected bf16 there (fp16 autocast is CUDA only)")
    return torch.autocast(device.type, dtype=_DTYPES[mode])


def cpu_has_bf16_kernels() -> bool:
    """Whether oneDNN has bf16 convolution and matmul kernels on this CPU (AVX-512 or Arm bf16).

    Without them torch falls back to element-by-element bf16 code: on an AVX2-only AMD EPYC one
    3x3 conv of 256 channels at 64x64 took 17.4 s in bf16 against 0.041 s in fp32 (docs/benchmarks.md,
    `bench/bf16_cpu_bench.py`), so a view that renders in 5 s in fp32 did not finish in 5 minutes.
    """
    probe = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    if probe is not None:
        try:
            return bool(probe())
        except RuntimeError:
            pass
    return bool(getattr(torch.cpu, "_is_avx512_supported", lambda: False)())


def check_amp_on(device: torch.device, amp: str | bool) -> str:
    """Refuse an --amp mode that `device` cannot run at speed, before any work starts; returns the mode.

    fp16 autocast is CUDA only; bf16 on a CPU needs its bf16 kernels (`cpu_has_bf16_kernels`), since
    without them it is hundreds of times slower than the exact fp32 it was meant to speed up.
    """
    mode = check_amp(amp)
    if mode == "fp16" and device.type != "cuda":
        raise UserInputError(f"--amp fp16: needs CUDA, got --device {device.type} (use bf16 there)")
    if mode == "bf16" and device.type == "cpu" and not cpu_has_bf16_kernels():
        raise UserInputError("--amp bf16: this CPU has no bf16 kernels (no AVX-512), so bf16 would run hundreds "
                             "of times slower than fp32; drop --amp (fp32 is exact)")
    return mode


NHWC_MIN_RESOLUTION = 256  # the tiny config's 64 px renders 1.13x slower in NHWC at batch 1 (docs/benchmarks.md)


def use_channels_last(requested: bool | None, device: torch.device, amp: str | bool,
                      resolution: int | None = None) -> bool:
    """Whether the convolutions run in NHWC memory: `requested`, or when None, by device:

    - CUDA: with autocast. Half-precision tensor-core convolutions (cuDNN) are NHWC kernels: fed NCHW
      they transpose around each call, which NHWC activations and weights avoid (the official EG3D
      offers this for its fp16 blocks as `fp16_channels_last`, off by default there).
    - CPU, rendering (callers without autograd pass the generator's image `resolution`): for a
      full-size generator in fp32, where this CPU's convolutions measured faster in NHWC
      (`cpu_layout.cpu_prefers_nhwc`: it differs between CPUs, 0.76x to 1.23x per view). Small
      generators and training stay NCHW (not measured to pay).
    - otherwise off.
    """
    if requested is not None:
        return bool(requested)
    if device.type == "cuda":
        return check_amp(amp) != "off"
    if device.type != "cpu" or resolution is None or resolution < NHWC_MIN_RESOLUTION or check_amp(amp) != "off":
        return False
    from my3dgen_cli.cpu_layout import cpu_prefers_nhwc

    return cpu_prefers_nhwc()


def compiled(fn: Callable, backend: str | None = None, fullgraph: bool = False) -> Callable:
    """torch.compile(fn) with our defaults: static shapes (views and batch sizes repeat).

    backend None = inductor (or $MY3DGEN_COMPILE_BACKEND); "aot_eager" traces without generating
    kernels (a quick check that the graph has no breaks or host syncs).
    """
    backend = backend or os.environ.get("MY3DGEN_COMPILE_BACKEND") or "inductor"
    return torch.compile(fn, backend=backend, fullgraph=fullgraph, dynamic=False)


_COMPILED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def compiled_synthesis(G: nn.Module) -> Callable:
    """G.synthesis compiled once per generator object (kept while G lives)."""
    fn = _COMPILED.get(G)
    if fn is None:
        fn = _COMPILED[G] = compiled(G.synthesis)
    return fn


def checkpointed_methods(G: nn.Module) -> list[tuple[nn.Module, str]]:
    """Where activations pile up: each backbone and superresolution block, and the tri-plane decoder
    (`decode_samples` and `decode`, which the renderer calls, and `forward`)."""
    from my3dgen_cli.eg3d.layers import SynthesisBlock

    blocks = [(m, "forward") for m in G.modules() if isinstance(m, SynthesisBlock)]
    decoder = [(G.decoder, name) for name in ("decode_samples", "decode", "forward") if hasattr(G.decoder, name)]
    return blocks + decoder


@contextlib.contextmanager
def activation_checkpointing(G: nn.Module, enabled: bool = True) -> Iterator[nn.Module]:
    """Run the memory-heavy modules under torch.utils.checkpoint while the context is open.

    The methods are wrapped on the instance (no parameter, buffer or name changes) and restored
    on exit. Sampling must be deterministic (it is in training) so the recomputation matches the
    first pass.
    """
    if not enabled:
        yield G
        return
    methods = checkpointed_methods(G)
    for module, name in methods:
        setattr(module, name, _checkpointed(getattr(module, name)))
    try:
        yield G
    finally:
        for module, name in methods:
            delattr(module, name)  # the instance attribute; the class's method shows through again


def _checkpointed(forward: Callable) -> Callable:
    @functools.wraps(forward)
    def run(*args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    return run


def use_all_cores() -> int:
    """CPU threads = the cores this process may run on (its affinity mask), capped by torch's default.

    torch defaults to the machine's physical cores, which in a container or under a CPU mask can be
    more than the process gets (oversubscription). OMP_NUM_THREADS, when set (torchrun sets 1 per
    rank), wins. Returns the thread count in use.
    """
    if "OMP_NUM_THREADS" not in os.environ and hasattr(os, "sched_getaffinity"):
        torch.set_num_threads(max(1, min(torch.get_num_threads(), len(os.sched_getaffinity(0)))))
    return torch.get_num_threads()


def cpu_workers(device: torch.device, items: int) -> int:
    """Into how many parts a CPU batch of `items` independent renders is split, one thread each (`run_parallel`):
    torch's CPU thread count, at most `items`; 1 off the CPU.

    The split changes the float order of the batch's sums (as torch's thread count itself does), so results
    match bit for bit on the same machine, not across machines with other core counts. Inside
    `ops.reference_paths()` a batch is one pass, as before this path existed.
    """
    from my3dgen_cli.eg3d.ops import fast_paths

    if device.type != "cpu" or not fast_paths():
        return 1
    return max(1, min(torch.get_num_threads(), items))


def run_parallel(tasks: Sequence[Callable[[], T]]) -> list[T]:
    """Run the tasks at once, each on its own thread, and return their results in order.

    Why: a tiny or small render is thousands of short ops. Split op by op over two OpenMP threads, each
    op waits for the sleeping second thread (OMP_WAIT_POLICY=PASSIVE, devices.cpu_thread_env), and a tiny
    training step took longer on 2 threads than on 1; split by photo, each thread runs whole passes and
    meets the others once, at the end (docs/benchmarks.md). torch ops release the GIL while they run.
    torch's CPU threads are shared out (each task gets its count // the tasks, at least 1). The tasks see the
    caller's context variables (`ops.reference_paths()`), grad mode and CPU autocast (torch keeps both per
    thread); the first runs on the calling thread; an exception in any is raised here after all have finished.
    """
    if len(tasks) == 1:
        return [tasks[0]()]
    results: list[Any] = [None] * len(tasks)
    errors: list[BaseException | None] = [None] * len(tasks)
    each = max(1, torch.get_num_threads() // len(tasks))
    grad = torch.is_grad_enabled()
    amp = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None

    finished = [threading.Event() for _ in tasks]

    def run(i: int, context: contextvars.Context) -> None:
        torch.set_num_threads(each)
        try:
            with torch.set_grad_enabled(grad), torch.autocast("cpu", dtype=amp, enabled=amp is not None):
                results[i] = context.run(tasks[i])
        except BaseException as err:  # re-raised on the calling thread
            errors[i] = err
        finally:
            finished[i].set()

    workers = [threading.Thread(target=run, args=(i, contextvars.copy_context()), daemon=True)
               for i in range(1, len(tasks))]
    started: list[threading.Event] = []
    with one_thread_each(len(tasks)):
        try:
            for i, worker in enumerate(workers, start=1):
                worker.start()
                started.append(finished[i])
            results[0] = tasks[0]()
        finally:
            _wait_all(started)
    for err in errors:
        if err is not None:
            raise err
    return results


def _wait_all(finished: Sequence[threading.Event]) -> None:
    """Wait until every started worker has finished its task, even through Ctrl-C (raised again after): a caller
    that went on while a worker still ran torch ops could exit under it, and the process then aborted at exit
    (`terminate called without an active exception`). Events, not Thread.join: in Python 3.11 a join cut by
    Ctrl-C marks the thread stopped while it still runs, so a second join returns at once."""
    interrupted = False
    for event in finished:
        while True:
            try:
                event.wait()
                break
            except KeyboardInterrupt:
                interrupted = True
    if interrupted:
        raise KeyboardInterrupt


@contextlib.contextmanager
def one_thread_each(tasks: int) -> Iterator[int]:
    """While open, this thread uses its share of torch's CPU threads when `tasks` run at once (the count // tasks,
    at least 1), as each of `run_parallel`'s tasks does; restored on exit. Yields the share."""
    before = torch.get_num_threads()
    each = max(1, before // tasks)
    torch.set_num_threads(each)
    try:
        yield each
    finally:
        torch.set_num_threads(before)


def summed_gradients(part_loss: Callable[[int, int], torch.Tensor], n: int, leaves: Sequence[torch.Tensor],
                     device: torch.device) -> torch.Tensor:
    """Backward of the sum over parts of `part_loss(lo, hi)`, a loss of rows lo:hi of a batch of `n` independent
    renders (weighted by the caller), into the leaves' `.grad`; returns the detached total.

    One pass and one backward, or on a CPU with several threads (`cpu_workers`) one part per thread
    (`run_parallel`), the parts' gradients added in order: the same sums up to float rounding.
    """
    parts = cpu_workers(device, n)
    if parts == 1:
        loss = part_loss(0, n)
        loss.backward()
        return loss.detach()

    def task(lo: int, hi: int) -> tuple[torch.Tensor, tuple[torch.Tensor | None, ...]]:
        loss = part_loss(lo, hi)
        return loss.detach(), torch.autograd.grad(loss, leaves, allow_unused=True)

    bounds = [(int(rows[0]), int(rows[-1]) + 1) for rows in torch.arange(n).tensor_split(parts)]
    results = run_parallel([functools.partial(task, lo, hi) for lo, hi in bounds])
    for _, grads in results:
        add_gradients(leaves, grads)
    return torch.stack([loss for loss, _ in results]).sum()


def add_gradients(leaves: Sequence[torch.Tensor], grads: Sequence[torch.Tensor | None]) -> None:
    """Add `torch.autograd.grad` results into the leaves' `.grad`, as backward() accumulates them.

    A new `.grad` starts as zeros shaped like its leaf: the gradient autograd.grad returns may be laid
    out otherwise (a broadcast's stride-0 view), which a later in-place add could not take.
    """
    for leaf, grad in zip(leaves, grads, strict=True):
        if grad is not None:
            if leaf.grad is None:
                leaf.grad = torch.zeros_like(leaf)
            leaf.grad.add_(grad)
