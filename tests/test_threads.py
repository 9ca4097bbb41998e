"""CPU threads: idle OpenMP threads sleep (set before torch loads) and torch uses only the allowed cores."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from my3dgen_cli.devices import cpu_thread_env

ROOT = Path(__file__).resolve().parents[1]


def _python(code: str, **popen) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")}
    env["PYTHONPATH"] = str(ROOT)
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120,
                          check=True, **popen)
    return done.stdout.strip()


def test_passive_wait_policy_unless_the_user_chose_one() -> None:
    environ: dict[str, str] = {}
    cpu_thread_env(environ)
    assert environ["OMP_WAIT_POLICY"] == "PASSIVE"
    mine = {"OMP_WAIT_POLICY": "ACTIVE"}
    cpu_thread_env(mine)
    assert mine["OMP_WAIT_POLICY"] == "ACTIVE"


def test_cli_sets_the_wait_policy_before_torch_loads() -> None:
    code = ("import atexit, os, sys\n"
            "from my3dgen_cli import cli\n"
            "atexit.register(lambda: print(os.environ.get('OMP_WAIT_POLICY'), 'torch' in sys.modules))\n"
            "sys.argv = ['my3dgen', '--version']\n"
            "cli.main()\n")
    assert _python(code).splitlines()[-1] == "PASSIVE False"


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="needs CPU affinity (Linux)")
def test_cpu_device_uses_only_the_cores_of_its_affinity_mask() -> None:
    one_core = min(os.sched_getaffinity(0))
    code = ("import torch\n"
            "torch.set_num_threads(4)\n"
            "from my3dgen_cli.devices import pick_device\n"
            "pick_device('cpu')\n"
            "print(torch.get_num_threads())\n")
    assert _python(code, preexec_fn=lambda: os.sched_setaffinity(0, {one_core})) == "1"


def test_run_parallel_keeps_order_context_and_errors() -> None:
    import threading

    import torch

    from my3dgen_cli.eg3d import ops
    from my3dgen_cli.speed import run_parallel

    threads = torch.get_num_threads()
    seen: list[tuple[threading.Thread, bool, int]] = []

    def task(i: int):
        seen.append((threading.current_thread(), ops.fast_paths(), torch.get_num_threads()))
        return torch.full((3,), float(i)).sum().item()

    with ops.reference_paths():
        assert run_parallel([lambda i=i: task(i) for i in range(3)]) == [0.0, 3.0, 6.0]
    assert len({id(thread) for thread, _, _ in seen}) == 3  # one thread each (kept alive in `seen`: ids stay unique)
    assert threading.main_thread() in [thread for thread, _, _ in seen]  # the first task runs on the caller's
    assert not any(fast for _, fast, _ in seen)  # the caller's reference_paths() reached every task
    assert all(n == max(1, threads // 3) for _, _, n in seen)
    assert torch.get_num_threads() == threads

    def broken() -> None:
        raise ValueError("part 2 failed")

    with pytest.raises(ValueError, match="part 2 failed"):
        run_parallel([lambda: 1, broken])
    assert torch.get_num_threads() == threads


def test_a_ctrl_c_in_run_parallel_waits_for_its_workers() -> None:
    """Ctrl-C while the calling thread waits: it is raised only after the worker's task has ended, or the process
    could exit under a worker running torch ops (it aborted). A cut Thread.join (Python 3.11) returned at once."""
    import signal
    import threading
    import time

    from my3dgen_cli.speed import run_parallel

    ended = threading.Event()

    def worker_task() -> None:
        time.sleep(0.6)
        ended.set()

    timer = threading.Timer(0.2, os.kill, args=(os.getpid(), signal.SIGINT))
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        timer.start()
        with pytest.raises(KeyboardInterrupt):
            run_parallel([lambda: None, worker_task])
        assert ended.is_set()
    finally:
        timer.cancel()
        signal.signal(signal.SIGINT, previous)


def test_run_parallel_carries_grad_mode_and_autocast() -> None:
    """torch keeps grad mode and autocast per thread: every task runs in the caller's, not a new thread's."""
    import torch

    from my3dgen_cli.speed import run_parallel

    def state() -> tuple[bool, bool, torch.dtype | None]:
        on = torch.is_autocast_enabled("cpu")
        return torch.is_grad_enabled(), on, torch.get_autocast_dtype("cpu") if on else None

    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert run_parallel([state] * 3) == [(False, True, torch.bfloat16)] * 3
    assert run_parallel([state] * 3) == [(True, False, None)] * 3


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_summed_gradients_in_parts_equal_one_backward(threads: int) -> None:
    """5 rows in 1, 2 or 3 parts (a thread each): the same total and gradients; leaves that already hold a
    gradient keep it (accumulated, as backward() does), leaves a part does not use are left alone, and a
    gradient autograd hands back as a broadcast (`y.sum()`'s) still adds up."""
    import torch

    from my3dgen_cli.speed import summed_gradients

    before = torch.get_num_threads()
    x0 = torch.linspace(-2, 2, 15).reshape(5, 3)
    weights = torch.arange(1.0, 6.0).unsqueeze(1)

    def run(n_threads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        x = x0.clone().requires_grad_(True)
        y = torch.zeros(4, requires_grad=True)
        unused = torch.zeros(2, requires_grad=True)
        x.grad = torch.ones_like(x)
        torch.set_num_threads(n_threads)
        try:
            total = summed_gradients(lambda lo, hi: (x[lo:hi].square() * weights[lo:hi]).sum() + y.sum(), 5,
                                     [x, y, unused], torch.device("cpu"))
        finally:
            torch.set_num_threads(before)
        return total, x.grad, y.grad, unused.grad

    total, grad, y_grad, unused_grad = run(threads)
    ref_total, ref_grad, _, _ = run(1)
    torch.testing.assert_close(total, ref_total)
    torch.testing.assert_close(grad, ref_grad)
    torch.testing.assert_close(grad, 1 + 2 * x0 * weights)
    torch.testing.assert_close(y_grad, torch.full((4,), float(min(threads, 5))))  # y.sum() once per part
    assert unused_grad is None


def test_keep_freed_memory_cuts_the_page_faults_of_repeated_tensors() -> None:
    """The demo's glibc setting (devices.keep_freed_memory): a 48 MB tensor made and freed 50 times faults its
    pages in once instead of every time (glibc's own threshold stops adapting at 32 MB); a user's own MALLOC_*
    variable is left alone."""
    import sys

    if not sys.platform.startswith("linux"):
        pytest.skip("glibc's mallopt: Linux only")
    code = """
import resource, sys, torch
from my3dgen_cli.devices import keep_freed_memory
print(keep_freed_memory() if sys.argv[1] == "on" else "off")
torch.ones(1)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(50):
    x = torch.ones(12 << 20)
    del x
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""
    runs = {}
    for mode in ("off", "on"):
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "GLIBC_TUNABLES"))}
        env["PYTHONPATH"] = str(ROOT)
        done = subprocess.run([sys.executable, "-c", code, mode], env=env, capture_output=True, text=True,
                              timeout=120, check=True)
        runs[mode] = done.stdout.split()
    assert runs["on"][0] == "True"
    faults_off, faults_on = int(runs["off"][1]), int(runs["on"][1])
    assert faults_off > 50 * 10_000 and faults_on < faults_off / 3, (faults_off, faults_on)  # 12288 pages each
    mine = _python("import os; os.environ['MALLOC_TRIM_THRESHOLD_'] = '1'\n"
                   "from my3dgen_cli.devices import keep_freed_memory; print(keep_freed_memory())")
    assert mine == "False"
