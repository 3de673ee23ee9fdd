"""A frame submitted to CUDA-graph lanes (agent.vision.gpu.Pending with a submitting frontend): how
its reader waits, fails and gives the slot back. CUDA cannot exist here: the slot's events are
stand-ins (the frontend's real path runs on the H200: docs/measurements/h200-2026-12-01-async)."""

from __future__ import annotations

import threading
from types import SimpleNamespace
from typing import Any

import pytest

from agent.errors import EngineError
from agent.vision import gpu
from agent.vision.gpu import Pending, _run_finished, _Slot
from agent.vision.types import Letterbox


class StandInEvent:
    def __init__(self) -> None:
        self.synchronized = 0

    def synchronize(self) -> None:
        self.synchronized += 1


def submitted_slot() -> tuple[_Slot, Pending]:
    slot = _Slot(0, StandInEvent(), StandInEvent(), [], threading.Event())  # type: ignore[arg-type]
    slot.keep = object()  # the frame's decoder buffer, held until the result
    frontend: Any = SimpleNamespace(submits=True, _collect=lambda s: "candidates")
    return slot, Pending(frontend, slot, Letterbox(1.0, 0.0, 0.0, 4, 4))


def test_the_result_waits_for_the_run_then_frees_the_slot() -> None:
    slot, pending = submitted_slot()
    threading.Timer(0.05, _run_finished, args=(slot,)).start()  # the lane ends the run a little later
    assert pending.result()[0] == "candidates"
    assert slot.done.synchronized == 1 and slot.free.is_set() and slot.keep is None  # type: ignore[attr-defined]


def test_a_failed_run_is_an_engine_error_and_frees_the_slot() -> None:
    slot, pending = submitted_slot()
    slot.error = RuntimeError("CUDA failure 700: an illegal memory access was encountered")
    _run_finished(slot)
    with pytest.raises(EngineError, match="inference failed: CUDA failure 700"):
        pending.result()
    assert slot.free.is_set() and slot.done.synchronized == 0  # type: ignore[attr-defined]


def test_a_run_too_late_keeps_its_slot_until_it_ends(monkeypatch: pytest.MonkeyPatch) -> None:
    """The reader gives up; the slot stays taken (the late run still writes its buffers, which a new
    frame must not get) and is freed when the run ends."""
    monkeypatch.setattr(gpu, "RESULT_WAIT_S", 0.05)
    slot, pending = submitted_slot()
    with pytest.raises(EngineError, match="not run within"):
        pending.result()
    assert not slot.free.is_set() and slot.abandoned and slot.keep is not None
    _run_finished(slot)  # the late run ends
    assert slot.free.is_set() and not slot.abandoned and slot.keep is None


def test_the_reader_is_told_when_the_run_is_queued_and_a_failing_hook_changes_nothing() -> None:
    slot, pending = submitted_slot()
    told: list[bool] = []
    slot.on_queued = lambda: told.append(pending.queued())
    assert not pending.queued()
    _run_finished(slot)  # the lane queued the results: the hook sees them queued
    assert told == [True] and pending.queued()

    def broken() -> None:
        raise RuntimeError("reader gone")
    slot2, pending2 = submitted_slot()
    slot2.on_queued = broken
    _run_finished(slot2)  # logged, not raised into the lane's thread
    assert pending2.queued() and pending2.result()[0] == "candidates"


def test_a_frontend_that_does_not_submit_has_nothing_to_wait_for() -> None:
    slot = _Slot(0, StandInEvent(), StandInEvent(), [], threading.Event())  # type: ignore[arg-type]
    frontend: Any = SimpleNamespace(submits=False)
    assert Pending(frontend, slot, Letterbox(1.0, 0.0, 0.0, 4, 4)).queued()


def test_ready_now_says_whether_stage_would_wait() -> None:
    """The capture thread submits a live frame itself only when stage() would not wait."""
    slots = [_Slot(i, StandInEvent(), StandInEvent(), [], threading.Event()) for i in range(gpu.SLOTS)]  # type: ignore[arg-type]
    fe: Any = gpu.GpuFrontend.__new__(gpu.GpuFrontend)  # only its slot bookkeeping: no CUDA here
    fe._slots, fe._next, fe._staged, fe.fills = slots, 1, 0, False
    fe._input_launched = [threading.Event() for _ in range(gpu.INPUTS)]
    assert not fe.ready_now()  # slot 1 not collected yet
    slots[1].free.set()
    assert not fe.ready_now()  # input buffer 0 not yet read by the run before
    fe._input_launched[0].set()
    assert fe.ready_now()
    # a lane that letterboxes device frames into its own input: only the slot counts
    fe.fills = True
    fe._input_launched[0].clear()
    assert fe.ready_now()
    slots[1].free.clear()
    assert not fe.ready_now()
