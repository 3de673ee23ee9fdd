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
    monkeypatch.setattr(gpu, "_RESULT_WAIT_S", 0.05)
    slot, pending = submitted_slot()
    with pytest.raises(EngineError, match="not run within"):
        pending.result()
    assert not slot.free.is_set() and slot.abandoned and slot.keep is not None
    _run_finished(slot)  # the late run ends
    assert slot.free.is_set() and not slot.abandoned and slot.keep is None
