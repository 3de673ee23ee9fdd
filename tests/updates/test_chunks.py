"""ChunkTransfers: real ChunkAssemblers on real files, the MQTT side and the worker side in two threads."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from agent.errors import UpdateError
from agent.updates.chunks import ChunkTransfers
from agent.updates.manifest import MqttSource

CHUNK = 256


def make(tmp_path: Path) -> tuple[ChunkTransfers, list[tuple[int, int]]]:
    seen: list[tuple[int, int]] = []
    return ChunkTransfers(threading.Condition(), tmp_path, 1 << 20, lambda d, t: seen.append((d, t))), seen


def test_chunks_from_another_thread_complete_the_transfer(tmp_path: Path) -> None:
    t, progress = make(tmp_path)
    data = bytes(range(256)) * 5  # 1280 bytes: 5 chunks
    mq = MqttSource(transfer_id="t1", chunk_size=CHUNK, chunks=5)
    with t._cv:
        t.open(mq, len(data))
        t.open(mq, len(data))  # a second job on the same transfer keeps the assembler
    assert t.add("nope", 0, b"x") == "dropped"

    def feed() -> None:
        for i in (4, 0, 2, 2, 1, 3):
            t.add("t1", i, data[i * CHUNK:(i + 1) * CHUNK])
            time.sleep(0.01)

    th = threading.Thread(target=feed)
    th.start()
    out = t.wait_complete(mq, len(data), 5.0, threading.Event(), tmp_path / "model.onnx")
    th.join()
    assert out.read_bytes() == data
    assert progress and progress[-1] == (len(data), len(data))


def test_a_stall_and_a_stop_end_the_wait_with_a_reason(tmp_path: Path) -> None:
    t, _ = make(tmp_path)
    mq = MqttSource(transfer_id="t2", chunk_size=CHUNK, chunks=2)
    with t._cv:
        t.open(mq, 400)
    with pytest.raises(UpdateError) as stalled:
        t.wait_complete(mq, 400, 0.3, threading.Event(), tmp_path / "m.onnx")
    assert stalled.value.reason == "transfer_stalled" and "2 of 2 chunks missing" in stalled.value.detail
    stop = threading.Event()
    stop.set()
    with pytest.raises(UpdateError) as stopped:
        t.wait_complete(mq, 400, 5.0, stop, tmp_path / "m.onnx")
    assert stopped.value.reason == "stopped"
    with pytest.raises(UpdateError) as unknown:
        t.wait_complete(MqttSource(transfer_id="t9", chunk_size=CHUNK, chunks=1), 10, 1.0, threading.Event(),
                        tmp_path / "m.onnx")
    assert unknown.value.reason == "bad_transfer"


def test_the_first_fatal_write_error_is_the_one_reported(tmp_path: Path) -> None:
    t, _ = make(tmp_path)
    mq = MqttSource(transfer_id="t3", chunk_size=CHUNK, chunks=2)
    with t._cv:
        t.open(mq, 400)
    assert t.add("t3", 7, b"x" * CHUNK) == "bad"  # an index out of range: refused, not fatal
    assert t.error is None
    t.assemblers["t3"].close()  # what a full disk does to it: later chunks hit a closed assembler
    assert t.add("t3", 0, b"x" * CHUNK) == "bad"
    first = t.error
    assert first is not None and first.reason == "bad_transfer"
    t.add("t3", 1, b"x" * (400 - CHUNK))
    assert t.error is first
    with pytest.raises(UpdateError) as err:
        t.wait_complete(mq, 400, 5.0, threading.Event(), tmp_path / "m.onnx")
    assert err.value is first and t.error is None


def test_release_keeps_a_transfer_another_job_needs_and_discard_removes_the_bytes(tmp_path: Path) -> None:
    t, _ = make(tmp_path)
    mq = MqttSource(transfer_id="t4", chunk_size=CHUNK, chunks=2)
    with t._cv:
        t.open(mq, 400)
        t.release("t4", ["t4"])
    assert "t4" in t.assemblers
    t.add("t4", 0, b"y" * CHUNK)
    with t._cv:
        t.release("t4", [])
    assert "t4" not in t.assemblers and list(tmp_path.glob("t4.*"))  # closed: the state stays to resume
    with t._cv:
        t.open(mq, 400)
    assert t.assemblers["t4"].received_bytes == CHUNK  # resumed from the bitmap on disk
    t.discard("t4")
    assert "t4" not in t.assemblers and not list(tmp_path.glob("t4.*"))
