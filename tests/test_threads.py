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
