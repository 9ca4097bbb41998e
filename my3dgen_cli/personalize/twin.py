"""A forked copy of a CPU training run that computes one task of every step (a part of the batch, or the
symmetry term) in a process of its own, beside the main process.

Why: a tiny training step is two small renders at once, one per core (training._gradients). On two threads of one
process each render's ~1,000 short torch calls from Python take the interpreter lock back and forth, and a pair of tiny
views took 1.24x the time of one view alone, where two processes took 1.03x (`bench/twin_bench.py`). The twin
is that second process. It is forked at the first step that has work for it, so it holds the same model, data
and loss networks without copying or pickling anything; the trained tensors are moved to shared memory first,
so each optimizer step the main process takes is already in the twin's weights for the next step. Per step it
receives a task's description (indices and cameras, as numpy arrays), runs it on one thread, writes the
gradients into shared buffers and replies with which of them exist. One thread only: GNU OpenMP, which torch's CPU
ops use, hangs in a forked child once the parent has run a parallel region, so steps whose tasks get more than one
thread each (more torch threads than tasks) run on threads (training._run_tasks).

The twin runs the very function a thread would have run, on one thread as that thread did, and the main process
adds its gradients in the same order: a run with the twin equals a run on threads bit for bit
(tests/test_train_twin.py). Linux only (fork), not inside a daemonic process (which may not have children);
elsewhere, with MY3DGEN_CPU_PROCESSES=0, or when the twin cannot start, steps run on threads as before. A twin that
dies, fails its task or is stopped (SIGSTOP) hands its task back: the main process computes it, the run goes on on
threads, and the result is the same.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch

DISABLE_ENV = "MY3DGEN_CPU_PROCESSES"  # "0": CPU training steps use threads only
POLL_S = 0.5  # how often a wait for the twin's reply checks that the twin still runs
STOPPED_POLLS = 4  # a twin seen stopped (SIGSTOP, a debugger) this many checks in a row is given up
Result = tuple[tuple[torch.Tensor | None, ...], torch.Tensor]  # (the leaves' gradients, a small tensor of totals)


class TwinLost(RuntimeError):
    """The twin process stopped or failed its task; the task is to be run by the caller."""


def available() -> bool:
    """Whether twins may be forked here: Linux (fork is unsafe or missing elsewhere), not switched off, not in a
    daemonic process (a multiprocessing.Pool worker, say: multiprocessing refuses it children)."""
    return (sys.platform.startswith("linux") and os.environ.get(DISABLE_ENV, "1").strip() != "0"
            and not multiprocessing.current_process().daemon)


def _stopped(pid: int) -> bool:
    """Whether the process is stopped (state T: SIGSTOP, Ctrl-Z; t: held by a debugger), from /proc."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            state = stat.read().rsplit(b")", 1)[1].split()[0]  # the name in parentheses may hold spaces
    except (OSError, IndexError):
        return False
    return state in (b"T", b"t")


class Twin:
    """One forked process that runs `run(task)` -> (gradients of `leaves`, totals like `totals_like`) on request.

    submit(task), then result(): the gradients come back as shared buffers, valid until the next submit.
    The leaves are moved to shared memory here (before the fork), so the twin always reads their current values;
    they must be changed in place only (optimizers do).
    """

    def __init__(self, run: Callable[[Any], Result], leaves: Sequence[torch.Tensor], totals_like: torch.Tensor):
        for leaf in leaves:
            leaf.share_memory_()
        self._buffers = [torch.empty_like(leaf, memory_format=torch.contiguous_format).share_memory_()
                         for leaf in leaves]
        self._totals = torch.empty_like(totals_like).share_memory_()
        context = multiprocessing.get_context("fork")
        self._conn, child = context.Pipe()
        self._proc = context.Process(target=_serve, args=(child, self._conn, run, self._buffers, self._totals),
                                     name="my3dgen-twin", daemon=True)
        # Ctrl-C waits until the child has set its own handling (_serve): one landing between the fork and then
        # would print a traceback from the twin.
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            with warnings.catch_warnings():  # 3.12+ warns on any fork of a threaded process (torch's OpenMP pool)
                warnings.simplefilter("ignore", DeprecationWarning)
                self._proc.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        child.close()
        self._pending = False

    @property
    def pid(self) -> int | None:
        return self._proc.pid

    def submit(self, task: Any) -> None:
        """Send a task (picklable: numbers, numpy arrays, tuples); raises TwinLost if the twin is gone."""
        try:
            self._conn.send(task)
        except (OSError, ValueError) as err:
            self.close()
            raise TwinLost(f"the CPU twin process is gone ({err})") from None
        self._pending = True

    def result(self) -> Result:
        """The submitted task's (gradients, totals); raises TwinLost if the twin died or its task failed."""
        try:
            self._wait()
            reply = self._conn.recv()
        except (EOFError, OSError) as err:
            self.close()
            raise TwinLost(f"the CPU twin process stopped ({type(err).__name__})") from None
        self._pending = False
        if reply[0] != "ok":
            self.close()
            raise TwinLost(f"the CPU twin process failed: {reply[1]}")
        grads = tuple(buffer if present else None for buffer, present in zip(self._buffers, reply[1], strict=True))
        return grads, self._totals.clone()

    def _wait(self) -> None:
        """Until a reply is ready; raises TwinLost if the twin exits or stays stopped (`STOPPED_POLLS`) meanwhile."""
        stopped = 0
        while not self._conn.poll(POLL_S):
            if not self._proc.is_alive():
                if self._conn.poll(0):  # it replied, then exited
                    return
                self.close()
                raise TwinLost(f"the CPU twin process exited (code {self._proc.exitcode})")
            stopped = stopped + 1 if _stopped(self._proc.pid) else 0
            if stopped >= STOPPED_POLLS:
                self.close()
                raise TwinLost("the CPU twin process was stopped")

    def close(self) -> None:
        """Stop the twin (a task in flight is abandoned) and wait for it briefly; a twin that does not end (stopped,
        or stuck) is killed."""
        try:
            if not self._pending:
                self._conn.send(None)
        except (OSError, ValueError):
            pass
        self._conn.close()
        deadline = time.monotonic() + 2.0
        while self._proc.is_alive() and time.monotonic() < deadline and not _stopped(self._proc.pid):
            self._proc.join(timeout=0.05)
        if self._proc.is_alive() and not _stopped(self._proc.pid):  # a stopped process takes SIGTERM only when resumed
            self._proc.terminate()
            self._proc.join(timeout=2.0)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join(timeout=2.0)


def _serve(conn: Any, parent_end: Any, run: Callable[[Any], Result], buffers: list[torch.Tensor],
           totals: torch.Tensor) -> None:
    """The twin's loop: one task per message until None or the main process goes away."""
    parent_end.close()  # else the pipe never reports the main process's end closing
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's to handle
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})  # blocked by Twin() across the fork
    torch.set_num_threads(1)  # (OpenMP's threads would hang in a forked child: see the module's docstring)
    while True:
        try:
            task = conn.recv()
        except (EOFError, OSError):
            return
        if task is None:
            return
        try:
            grads, task_totals = run(task)
            present = []
            for buffer, grad in zip(buffers, grads, strict=True):
                present.append(grad is not None)
                if grad is not None:
                    buffer.copy_(grad)
            totals.copy_(task_totals)
            reply: tuple = ("ok", present)
        except Exception as err:  # reported to the main process, which runs the task itself
            reply = ("error", f"{type(err).__name__}: {err}")
        try:
            conn.send(reply)
        except OSError:
            return
