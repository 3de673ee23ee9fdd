"""Property tests of the MQTT update handlers and the transfer state (CI size of the fuzzing; long runs:
scripts/fuzz_atheris.py, release size: python3 -m reliability --only fuzz).

Messages go through the agent's real MqttClient callback into an UpdateManager busy with a
half-received transfer over a real ModelStore (tests/support/fuzzing.py). Every input must be
handled without a crash (no exception but UpdateError, no traceback logged by the callbacks'
catch-alls), and a rejected or ignored one must change nothing: store files, transfer state, the
manager's queued / current job, assemblers, processed ids and reported update state.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from agent.mqtt.topics import Topics
from tests.support import fuzzing as fz

CI = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                      HealthCheck.data_too_large])

Harness = tuple[fz.UpdateHarness, Any]


@pytest.fixture(scope="module")
def harness(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Harness]:
    with fz.captured_agent_logs() as traces:
        h = fz.UpdateHarness(tmp_path_factory.mktemp("fuzz-updates"))
        try:
            yield h, traces
        finally:
            h.close()


def _clean(out: fz.Outcome) -> None:
    assert out.crash is None, out.crash
    assert not out.changed, f"a {out.verdict} input changed state: {out.changed}"


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30),
                    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner,
                                                                                max_size=5),
                    max_leaves=10)
MANIFEST_KEYS = ["schema", "id", "model", "source", "targets", "issued_at", "expires_at", "rollback", "key_id",
                 "signature"]


@CI
@given(payload=st.binary(max_size=3000))
@example(payload=b"")  # an empty payload clears a retained message: ignored
@example(payload=b"[" * 100_000)
@example(payload=b'{"signature": "AAAA", "key_id": "ops", "key_id": "ops"}')
def test_manifest_random_bytes(harness: Harness, payload: bytes) -> None:
    h, traces = harness
    _clean(h.deliver("manifest", h.topics.model_update, payload, traces))


@CI
@given(edits=st.lists(st.tuples(st.integers(0, 1200), st.integers(0, 16), st.binary(max_size=8)), min_size=1,
                      max_size=4),
       group=st.booleans())
def test_manifest_byte_edits_of_a_signed_one(harness: Harness, edits: list[tuple[int, int, bytes]],
                                             group: bool) -> None:
    h, traces = harness
    buf = bytearray(fz.sign(fz.base_manifest(b"x" * 500, manifest_id="m-edit-00001"), h.key))
    for at, cut, ins in edits:
        pos = min(at, len(buf))
        buf[pos:pos + cut] = ins
    topic = h.topics.group_model_update(fz.GROUP) if group else h.topics.model_update
    _clean(h.deliver("manifest", topic, bytes(buf), traces))


@CI
@given(overrides=st.dictionaries(st.sampled_from(MANIFEST_KEYS[:-2]), JSON, min_size=1, max_size=3),
       model=st.dictionaries(st.sampled_from(["name", "version", "sha256", "size", "input", "labels", "decoder",
                                              "extra"]), JSON, max_size=2),
       mid=st.from_regex(r"[A-Za-z0-9_-]{8,20}", fullmatch=True))
def test_signed_manifests_with_arbitrary_fields(harness: Harness, overrides: dict[str, Any], model: dict[str, Any],
                                                mid: str) -> None:
    """Signed by the trusted key, so every value reaches the schema and the checks after it."""
    h, traces = harness
    doc = fz.base_manifest(b"y" * 700, manifest_id=mid, version="7")
    doc["model"].update(model)
    doc.update(overrides)
    _clean(h.deliver("manifest", h.topics.model_update, fz.sign(doc, h.key), traces))


@CI
@given(seed=st.integers(0, 2**32 - 1))
def test_generated_manifest_cases(harness: Harness, seed: int) -> None:
    """The reliability scenario's generators: structural mutations re-signed, stale signatures, rogue keys."""
    h, traces = harness
    topic, payload, _kind = h.manifest_case(fz.Mutator(random.Random(seed)))
    _clean(h.deliver("manifest", topic, payload, traces))


LEVEL = st.text(st.characters(codec="utf-8"), max_size=12) | st.sampled_from(["0", "1", "01", "-1", "1023", "1024",
                                                                              "999999999", "1000000000", "+", "#"])


@CI
@given(device=st.sampled_from([fz.DEVICE, "group", "other", ""]), tid=LEVEL | st.just("BUSY"), index=LEVEL,
       extra=st.sampled_from(["", "/x", "/"]), payload=st.binary(max_size=600) | st.just(bytes(fz.BUSY_CHUNK)))
@example(device=fz.DEVICE, tid="BUSY", index="0", extra="", payload=b"\xff" * fz.BUSY_CHUNK)  # duplicate, new bytes
@example(device=fz.DEVICE, tid="BUSY", index="1024", extra="", payload=bytes(fz.BUSY_CHUNK))  # one past the end
def test_chunk_topics_and_payloads(harness: Harness, device: str, tid: str, index: str, extra: str,
                                   payload: bytes) -> None:
    h, traces = harness
    tid = h.busy_tid if tid == "BUSY" else tid
    mid = f"group/{fz.GROUP}" if device == "group" else device
    topic = f"{fz.PREFIX}/{mid}/model/chunks/{tid}/{index}{extra}"
    _clean(h.deliver("chunk", topic, payload, traces))


@CI
@given(topic=st.binary(max_size=120), payload=st.binary(max_size=300))
@example(topic=b"edge/dev1/model/chunks/\xff/0", payload=b"x")  # not UTF-8: the client drops it
def test_chunk_raw_topic_bytes(harness: Harness, topic: bytes, payload: bytes) -> None:
    h, traces = harness
    _clean(h.deliver("chunk", topic, payload, traces))


@CI
@given(seed=st.integers(0, 2**32 - 1))
def test_generated_chunk_cases(harness: Harness, seed: int) -> None:
    h, traces = harness
    topic, payload, _kind = h.chunk_case(fz.Mutator(random.Random(seed)))
    _clean(h.deliver("chunk", topic, payload, traces))


@CI
@given(topic=st.text(max_size=80))
@example(topic="edge/dev1/model/chunks/t/0")
@example(topic="edge/group/line-3/model/chunks/t/999999999")
def test_parse_chunk_topic_is_total(topic: str) -> None:
    """Any topic string parses to None or to a transfer id and an index in range, never an exception."""
    t = Topics("edge", "dev1")
    parsed = t.parse_chunk_topic(topic)
    if parsed is not None:
        tid, idx = parsed
        assert tid and "/" not in tid
        assert 0 <= idx < 10**9
        assert topic.endswith(f"/{tid}/{idx}")


@CI
@given(state=st.binary(max_size=400) | JSON.map(lambda v: json.dumps(v).encode()))
@example(state=b"[" * 100_000)  # regression: RecursionError escaped ChunkAssembler's resume
@example(state=b'{"a":' * 5000 + b"1" + b"}" * 5000)
def test_transfer_state_file_any_bytes(tmp_path_factory: pytest.TempPathFactory, state: bytes) -> None:
    _clean(fz.run_transfer_state(tmp_path_factory.getbasetemp() / "transfer-state", state))


@CI
@given(fields=st.dictionaries(st.sampled_from(["v", "transfer_id", "chunk_size", "chunks", "size", "bitmap", "x"]),
                              JSON, min_size=1, max_size=3))
def test_transfer_state_fields(tmp_path_factory: pytest.TempPathFactory, fields: dict[str, Any]) -> None:
    """A state file resumes only when it describes this very transfer (run_transfer_state checks)."""
    doc = {**fz.valid_transfer_state(5), **fields}
    _clean(fz.run_transfer_state(tmp_path_factory.getbasetemp() / "transfer-fields", json.dumps(doc).encode()))


def test_deep_state_file_starts_afresh(tmp_path: Path) -> None:
    """Regression (found by fuzzing): a damaged `.state` file nested past the recursion limit made
    ChunkAssembler raise RecursionError; the manager's _enqueue only catches UpdateError, so a
    resumed update could take the service start down with it. It now starts the transfer afresh."""
    out = fz.run_transfer_state(tmp_path, b"[" * 100_000 + b"]" * 100_000)
    assert out.crash is None and out.verdict == "rejected"


def test_harness_sees_a_state_change(harness: Harness) -> None:
    """The invariant check is not vacuous: a held chunk's bytes rewritten under it is reported."""
    h, _ = harness
    before = h.snapshot()
    with h.mgr._cv:
        asm = h.mgr._chunks.assemblers[h.busy_tid]
    part = asm.part_path
    data = part.read_bytes()
    try:
        part.write_bytes(b"\x01" + data[1:])
        assert any(".part" in c for c in h.diff(before, h.snapshot()))
    finally:
        part.write_bytes(data)
    assert h.diff(before, h.snapshot()) == []
