from __future__ import annotations

import errno
import hashlib
import os
import random
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.errors import UpdateError
from agent.updates import transfer
from agent.updates.transfer import ChunkAssembler, download_url
from tests.updates.helpers import RangeServer, tmpfs

DATA = random.Random(7).randbytes(300_000)


@pytest.fixture
def server() -> Iterator[RangeServer]:
    s = RangeServer(DATA)
    try:
        yield s
    finally:
        s.close()


def test_http_download_full(server: RangeServer, tmp_path: Path) -> None:
    seen: list[tuple[int, int]] = []
    out = download_url(server.url, tmp_path / "m.onnx", len(DATA), 10**6, 5, lambda d, t: seen.append((d, t)))
    assert out.read_bytes() == DATA
    assert seen[-1] == (len(DATA), len(DATA))
    assert not (tmp_path / "m.onnx.part").exists()
    assert "Range" not in server.requests[0]


def test_http_resume_with_range(server: RangeServer, tmp_path: Path) -> None:
    (tmp_path / "m.onnx.part").write_bytes(DATA[:100_000])
    out = download_url(server.url, tmp_path / "m.onnx", len(DATA), 10**6, 5)
    assert out.read_bytes() == DATA
    assert server.requests[0]["Range"] == "bytes=100000-"


def test_http_resume_after_connection_loss(server: RangeServer, tmp_path: Path) -> None:
    server.drop_after = 120_000
    with pytest.raises(UpdateError) as ei:
        download_url(server.url, tmp_path / "m.onnx", len(DATA), 10**6, 5)
    assert ei.value.reason == "download_failed"
    assert (tmp_path / "m.onnx.part").stat().st_size == 120_000  # kept for the resume
    server.drop_after = None
    out = download_url(server.url, tmp_path / "m.onnx", len(DATA), 10**6, 5)
    assert out.read_bytes() == DATA
    assert server.requests[-1]["Range"] == "bytes=120000-"


def test_http_server_ignoring_range_restarts(server: RangeServer, tmp_path: Path) -> None:
    server.ignore_range = True
    (tmp_path / "m.onnx.part").write_bytes(b"garbage" * 100)
    out = download_url(server.url, tmp_path / "m.onnx", len(DATA), 10**6, 5)
    assert out.read_bytes() == DATA


def test_http_complete_partial_is_not_refetched(server: RangeServer, tmp_path: Path) -> None:
    (tmp_path / "m.onnx.part").write_bytes(DATA)
    assert download_url(server.url, tmp_path / "m.onnx", len(DATA), 10**6, 5).read_bytes() == DATA
    assert server.requests == []


def test_http_timeout_keeps_partial(server: RangeServer, tmp_path: Path) -> None:
    server.stall_s = 1.5
    with pytest.raises(UpdateError) as ei:
        download_url(server.url, tmp_path / "m.onnx", len(DATA), 10**6, 0.3)
    assert ei.value.reason == "download_timeout"


def test_http_size_cap(server: RangeServer, tmp_path: Path) -> None:
    with pytest.raises(UpdateError) as ei:
        download_url(server.url, tmp_path / "m.onnx", len(DATA), len(DATA) - 1, 5)
    assert ei.value.reason == "too_large"
    server.extra = 5000  # the server sends more than the manifest says
    with pytest.raises(UpdateError) as ei:
        download_url(server.url, tmp_path / "m.onnx", len(DATA), 10**6, 5)
    assert ei.value.reason == "too_large"
    assert not (tmp_path / "m.onnx.part").exists()


def test_http_short_body_is_size_mismatch(tmp_path: Path) -> None:
    s = RangeServer(DATA[:1000])
    try:
        with pytest.raises(UpdateError) as ei:
            download_url(s.url, tmp_path / "m.onnx", len(DATA), 10**6, 5)
        assert ei.value.reason == "size_mismatch"
    finally:
        s.close()


def test_http_error_status(server: RangeServer, tmp_path: Path) -> None:
    server.status = 404
    with pytest.raises(UpdateError) as ei:
        download_url(server.url, tmp_path / "m.onnx", len(DATA), 10**6, 5)
    assert ei.value.reason == "download_failed"


def test_file_url_and_bad_scheme(tmp_path: Path) -> None:
    src = tmp_path / "src.onnx"
    src.write_bytes(DATA)
    assert download_url(src.as_uri(), tmp_path / "out" / "m.onnx", len(DATA), 10**6, 5).read_bytes() == DATA
    with pytest.raises(UpdateError) as ei:
        download_url("ftp://x/y", tmp_path / "m2", 10, 100, 5)
    assert ei.value.reason == "bad_url"
    with pytest.raises(UpdateError) as ei:
        download_url("file://otherhost/etc/passwd", tmp_path / "m3", 10, 100, 5)
    assert ei.value.reason == "bad_url"


def test_enospc_injection_removes_partial(server: RangeServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = transfer._open_part

    class Full:
        def __init__(self, f: object) -> None:
            self.f = f
            self.n = 0

        def __enter__(self) -> Full:
            return self

        def __exit__(self, *a: object) -> None:
            self.f.close()  # type: ignore[attr-defined]

        def write(self, b: bytes) -> int:
            self.n += 1
            if self.n > 2:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.f.write(b)  # type: ignore[attr-defined]

    monkeypatch.setattr(transfer, "_open_part", lambda p, a: Full(real(p, a)))
    with pytest.raises(UpdateError) as ei:
        download_url(server.url, tmp_path / "m.onnx", len(DATA), 10**6, 5)
    assert ei.value.reason == "disk_full"
    assert not (tmp_path / "m.onnx.part").exists()


def test_real_disk_full_on_tiny_tmpfs(tmp_path: Path) -> None:
    big = random.Random(1).randbytes(2 * 1024 * 1024)
    s = RangeServer(big)
    try:
        with tmpfs(tmp_path / "fs", "1m") as fs:
            if fs is None:
                pytest.skip("mount -t tmpfs is not permitted here (needs root / CAP_SYS_ADMIN)")
            with pytest.raises(UpdateError) as ei:
                download_url(s.url, fs / "m.onnx", len(big), 10 * 1024 * 1024, 5)
            assert ei.value.reason == "disk_full"
            assert list(fs.iterdir()) == []
            # chunks too: the assembler's sparse file fills up as chunks land
            with pytest.raises(UpdateError) as ei2, ChunkAssembler(fs, "t1", 65536, 32, len(big),
                                                                   10 * 1024 * 1024) as asm:
                for i in range(32):
                    asm.add(i, big[i * 65536:(i + 1) * 65536])
            assert ei2.value.reason == "disk_full"
            assert not (fs / "t1.part").exists()
    finally:
        s.close()


# ---- chunk assembly ----------------------------------------------------------------------------

def chunks_of(data: bytes, size: int) -> list[bytes]:
    return [data[i:i + size] for i in range(0, len(data), size)]


def test_chunks_out_of_order_and_duplicates(tmp_path: Path) -> None:
    parts = chunks_of(DATA, 4096)
    order = list(range(len(parts))) * 2
    random.Random(3).shuffle(order)
    progress: list[int] = []
    with ChunkAssembler(tmp_path, "tx1", 4096, len(parts), len(DATA), 10**6,
                        progress=lambda d, t: progress.append(d)) as asm:
        new = [asm.add(i, parts[i]) for i in order]
        assert sum(new) == len(parts)
        assert asm.complete and asm.missing() == []
        out = asm.finalize()
    assert out.read_bytes() == DATA
    assert progress[-1] == len(DATA)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tx1.bin"]


def test_chunks_resume_after_restart(tmp_path: Path) -> None:
    parts = chunks_of(DATA, 4096)
    n = len(parts)
    asm = ChunkAssembler(tmp_path, "tx2", 4096, n, len(DATA), 10**6, persist_every=1)
    for i in range(0, n, 2):
        asm.add(i, parts[i])
    del asm  # an agent crash: no close, no flush
    asm2 = ChunkAssembler(tmp_path, "tx2", 4096, n, len(DATA), 10**6)
    assert asm2.missing() == list(range(1, n, 2))
    assert asm2.add(0, parts[0]) is False  # held already: not needed again
    for i in asm2.missing():
        asm2.add(i, parts[i])
    assert hashlib.sha256(asm2.finalize().read_bytes()).digest() == hashlib.sha256(DATA).digest()


def test_chunk_bitmap_outlives_a_killed_process(tmp_path: Path) -> None:
    # Every chunk is recorded (unsynced) as it arrives: the broker already has our PUBACK, so a
    # process killed between two fsyncs must not forget a chunk it acknowledged.
    parts = chunks_of(DATA, 4096)
    asm = ChunkAssembler(tmp_path, "tx3", 4096, len(parts), len(DATA), 10**6, persist_every=10)
    for i in range(25):
        asm.add(i, parts[i])
    del asm  # no close(): what a SIGKILL leaves
    asm2 = ChunkAssembler(tmp_path, "tx3", 4096, len(parts), len(DATA), 10**6)
    assert asm2.received == 25
    assert asm2.missing()[0] == 25
    asm2.close()
    asm3 = ChunkAssembler(tmp_path, "tx3", 4096, len(parts) + 1, len(DATA) + 4096, 10**6)  # other params: reset
    assert asm3.received == 0
    asm3.discard()
    assert list(tmp_path.iterdir()) == []


def test_chunk_rejections(tmp_path: Path) -> None:
    with pytest.raises(UpdateError) as ei:
        ChunkAssembler(tmp_path, "../evil", 1024, 1, 10, 100)
    assert ei.value.reason == "bad_transfer"
    with pytest.raises(UpdateError):
        ChunkAssembler(tmp_path, "t", 1024, 3, 1024, 10**6)  # count does not fit the size
    with pytest.raises(UpdateError) as ei:
        ChunkAssembler(tmp_path, "t", 1024, 2, 2000, 1999)
    assert ei.value.reason == "too_large"
    asm = ChunkAssembler(tmp_path, "t", 1024, 3, 2500, 10**6)
    for idx, data in ((3, b"x" * 1024), (-1, b"x" * 1024), (0, b"x" * 1000), (2, b"x" * 1024), (1, b"")):
        with pytest.raises(UpdateError) as ei:
            asm.add(idx, data)
        assert ei.value.reason == "bad_chunk"
    assert asm.add(2, b"z" * 452) is True  # the last chunk is shorter
    with pytest.raises(UpdateError) as ei:
        asm.finalize()
    assert ei.value.reason == "incomplete"
    assert asm.missing() == [0, 1]
    asm.close()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(tid=st.text(max_size=12), chunk=st.integers(-2, 70), count=st.integers(-1, 6), size=st.integers(-1, 300),
       ops=st.lists(st.tuples(st.integers(-2, 8), st.integers(0, 80)), max_size=20))
def test_fuzz_assembler(tmp_path_factory: pytest.TempPathFactory, tid: str, chunk: int, count: int, size: int,
                        ops: list[tuple[int, int]]) -> None:
    root = tmp_path_factory.mktemp("fz")
    d = root / "d"
    try:
        asm = ChunkAssembler(d, tid, chunk, count, size, 250)
    except UpdateError:
        asm = None
    if asm is not None:
        for idx, n in ops:
            try:
                asm.add(idx, bytes([idx % 256]) * n)
            except UpdateError:
                pass
        if asm.complete:
            out = asm.finalize()
            assert out.stat().st_size == size
        asm.close()
    outside = [p for p in root.rglob("*") if p != d and d not in p.parents]
    assert outside == []
    for p in d.rglob("*") if d.exists() else []:
        assert os.path.commonpath([p.resolve(), d.resolve()]) == str(d.resolve())
