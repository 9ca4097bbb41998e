"""heap.release_free: freed C-heap pages go back to the OS before a large CPU stage, and only then."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from my3dgen_cli.eg3d import heap

_FREED_THEN_TRIMMED = """
import torch
from my3dgen_cli.eg3d import heap

def rss_mib():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:")) / 1024

# blocks below glibc's mmap threshold stay in its heap when freed (freeing a mapped 8 MiB block first
# raises that threshold past 4 MiB, as a view's first freed tensors do); small survivors between them
# pin the heap, so neither its end moves nor glibc's own trimming of the top returns them
big = torch.ones(2 << 20)
del big
blocks, survivors = [], []
for _ in range(64):
    blocks.append(torch.ones(1 << 20))  # 4 MiB
    survivors.append(torch.ones(1 << 14))  # 64 KiB
del blocks
before = rss_mib()
with torch.no_grad():
    trimmed = heap.release_free(64 << 20, torch.device("cpu"))
print(trimmed, before, rss_mib(), sum(float(t.sum()) for t in survivors))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux") or heap._malloc_trim() is None, reason="glibc only")
def test_freed_heap_pages_leave_the_process() -> None:
    # in a fresh process: what the heap holds depends on everything the process did before
    out = subprocess.run([sys.executable, "-c", _FREED_THEN_TRIMMED], capture_output=True, text=True, check=True)
    trimmed, before, after, survivors = out.stdout.split()
    assert trimmed == "True" and float(survivors) == 64 * (1 << 14)
    assert float(before) - float(after) > 100, (before, after)  # most of the 256 MiB went back


def test_only_large_cpu_stages_outside_autograd_trim(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    monkeypatch.setattr(heap, "_malloc_trim", lambda: calls.append)
    cpu = torch.device("cpu")
    with torch.no_grad():
        assert not heap.release_free(heap.MIN_STAGE_BYTES - 1, cpu)  # the tiny config: page faults only
        assert not heap.release_free(1 << 30, torch.device("meta"))
        assert heap.release_free(heap.MIN_STAGE_BYTES, cpu)
    assert not heap.release_free(1 << 30, cpu)  # training: the graph holds what it needs, trim nothing
    assert calls == [0]
    monkeypatch.setattr(heap, "_malloc_trim", lambda: None)  # not glibc
    with torch.no_grad():
        assert not heap.release_free(1 << 30, cpu)
