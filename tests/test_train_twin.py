"""The CPU twin process (personalize/twin.py): a tiny training run whose steps are split over two processes equals
the same run split over two threads bit for bit, and goes on the same when the twin dies, fails or is interrupted.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys

import pytest
import torch

from my3dgen_cli.personalize import training, twin
from my3dgen_cli.personalize.pipeline import PersonalizeConfig
from my3dgen_cli.personalize.training import TrainingInterrupted, train_adapter
from tests.personalize_helpers import TRAIN_YAWS, fresh, make_person, views

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the twin is forked (Linux only)")


@pytest.fixture(scope="module")
def person():
    return make_person()


@pytest.fixture
def two_threads():
    """Two CPU workers: each step's two photos (or batch and symmetry term) run at once."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def _twins_alive() -> list[multiprocessing.Process]:
    return [p for p in multiprocessing.active_children() if p.name == "my3dgen-twin"]


def _train(person, monkeypatch, processes: bool, on_step=None, steps: int = 5):
    monkeypatch.setenv(twin.DISABLE_ENV, "1" if processes else "0")
    _, w, hidden = person
    G = fresh(person)
    images, raws, cams = views(hidden, w, TRAIN_YAWS[:4])
    config = PersonalizeConfig(steps=steps, batch=2, sym=True, sym_every=2, checkpoint_every=0, seed=3)
    result = train_adapter(G, images, cams, w.expand(4, -1, -1), config, raw_images=raws, on_step=on_step)
    return G, result


def _assert_same_run(a, b) -> None:
    (G_a, run_a), (G_b, run_b) = a, b
    assert run_a.log == run_b.log  # every loss term of every step, exactly
    assert any("sym" in record for record in run_a.log) and any("sym" not in record for record in run_a.log)
    state_a, state_b = G_a.state_dict(), G_b.state_dict()
    assert state_a.keys() == state_b.keys()
    for key in state_a:
        assert torch.equal(state_a[key], state_b[key]), key


@pytest.fixture(scope="module")
def on_threads(person):
    with pytest.MonkeyPatch.context() as mp:
        before = torch.get_num_threads()
        torch.set_num_threads(2)
        try:
            return _train(person, mp, processes=False)
        finally:
            torch.set_num_threads(before)


def test_a_run_with_the_twin_equals_the_run_on_threads_bit_for_bit(person, monkeypatch, two_threads, on_threads):
    alive = []
    run = _train(person, monkeypatch, True, on_step=lambda step, record: alive.append(len(_twins_alive())))
    assert alive == [1] * 5  # forked at the first step, serving every step
    assert not _twins_alive()  # stopped with the run
    _assert_same_run(run, on_threads)
    G, _ = run
    assert any(p.is_shared() for p in G.parameters())  # the trained tensors were shared with it


def test_switched_off_no_twin_is_forked(person, monkeypatch, two_threads, on_threads):
    alive = []
    run = _train(person, monkeypatch, False, on_step=lambda step, record: alive.append(len(_twins_alive())))
    assert alive == [0] * 5
    _assert_same_run(run, on_threads)


def test_a_killed_twin_hands_its_task_back_and_the_run_ends_the_same(person, monkeypatch, two_threads, on_threads):
    def kill_twin(step, record):
        if step == 2:
            (process,) = _twins_alive()
            os.kill(process.pid, signal.SIGKILL)
            process.join()

    run = _train(person, monkeypatch, True, on_step=kill_twin)
    _assert_same_run(run, on_threads)


def test_a_task_failing_in_the_twin_is_run_here_instead(person, monkeypatch, two_threads, on_threads):
    main = os.getpid()
    real = training._part_gradients

    def fails_in_the_twin(*args):
        if os.getpid() != main:
            raise MemoryError("the twin ran out of memory")
        return real(*args)

    monkeypatch.setattr(training, "_part_gradients", fails_in_the_twin)
    run = _train(person, monkeypatch, True)
    assert not _twins_alive()
    _assert_same_run(run, on_threads)


def test_an_interrupted_run_stops_its_twin(person, monkeypatch, two_threads):
    def interrupt(step, record):
        if step == 2:
            raise KeyboardInterrupt

    with pytest.raises(TrainingInterrupted):
        _train(person, monkeypatch, True, on_step=interrupt)
    assert not _twins_alive()


def test_a_lost_twin_is_reported_to_the_caller():
    leaf = torch.zeros(3)
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, set())
    pair = twin.Twin(lambda task: ((leaf + task,), torch.ones(4)), [leaf], torch.zeros(4))
    assert signal.pthread_sigmask(signal.SIG_BLOCK, set()) == mask  # Ctrl-C was held only across the fork
    pair.submit(2.0)
    grads, totals = pair.result()
    assert torch.equal(grads[0], torch.full((3,), 2.0)) and torch.equal(totals, torch.ones(4))
    os.kill(pair.pid, signal.SIGKILL)
    pair._proc.join()
    with pytest.raises(twin.TwinLost):
        pair.submit(1.0)
        pair.result()


def test_with_more_threads_than_tasks_the_steps_run_on_threads(person, monkeypatch):
    """4 torch threads and 2 tasks: each task gets 2 threads, which a forked twin cannot use (OpenMP hangs in a
    forked child), so no twin is forked and the run is the run on threads, bit for bit."""
    before = torch.get_num_threads()
    torch.set_num_threads(4)
    try:
        shares, alive = [], []
        real = training._run_task
        monkeypatch.setattr(training, "_run_task", lambda loop, task: (shares.append(torch.get_num_threads()),
                                                                         real(loop, task))[1])
        run = _train(person, monkeypatch, True, steps=3, on_step=lambda step, r: alive.append(len(_twins_alive())))
        threads = _train(person, monkeypatch, False, steps=3)
    finally:
        torch.set_num_threads(before)
    assert alive == [0] * 3 and set(shares) == {2}
    _assert_same_run(run, threads)


def _report_available(queue) -> None:
    queue.put(twin.available())


def test_no_twin_is_forked_from_a_daemonic_process():
    """A multiprocessing daemon (a Pool worker) may not have children: training there runs on threads."""
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    worker = context.Process(target=_report_available, args=(queue,), daemon=True)
    worker.start()
    assert queue.get(timeout=60) is False
    worker.join()
    assert twin.available()  # here, in a normal process


def test_a_stopped_twin_is_given_up_and_killed(monkeypatch):
    """A twin stopped by SIGSTOP (or a debugger) never replies: the wait gives it up and close() kills it, where
    SIGTERM would stay pending until it resumed."""
    monkeypatch.setattr(twin, "POLL_S", 0.05)
    leaf = torch.zeros(3)
    pair = twin.Twin(lambda task: ((leaf + task,), torch.ones(4)), [leaf], torch.zeros(4))
    os.kill(pair.pid, signal.SIGSTOP)
    try:
        pair.submit(1.0)
        with pytest.raises(twin.TwinLost, match="stopped"):
            pair.result()
        assert not pair._proc.is_alive() and pair._proc.exitcode == -signal.SIGKILL
    finally:
        if pair._proc.is_alive():
            os.kill(pair.pid, signal.SIGKILL)
