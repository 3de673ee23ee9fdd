"""What a device does with a valid manifest when its clock is wrong (no faketime needed here).

The rule (agent/updates/manifest.py): accepted when issued_at - skew <= now <= expires_at + skew
(skew 300 s); a clock before 2024-01-01 counts as unset and refuses every manifest. The same cases
run against a real agent under libfaketime in the reliability suite (`clock_skew` scenario).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.config import UpdatesConfig
from agent.errors import UpdateError
from agent.models.store import ModelStore
from agent.mqtt.topics import Topics
from agent.updates.manager import UpdateManager
from agent.updates.manifest import CLOCK_UNSET_BEFORE, DEFAULT_CLOCK_SKEW_S, generate_keypair, verify_manifest
from tests.updates.helpers import NOW, make_manifest, signed_bytes
from tests.updates.test_manager import Bus, FakeHost, model_file, wait_state

DAY = 86400
TTL = 3600  # what `edge-agent fleet push-model` signs by default (--expires-in)

# (case, device clock as a function of issued_at, manifest ttl, expected: None = accepted, else the reason)
CASES: list[tuple[str, int, int, str | None]] = [
    ("in_sync", NOW, TTL, None),
    ("behind_2_years", NOW - 730 * DAY, TTL, "not_yet_valid"),
    ("unset_2020", 1_577_836_800, TTL, "not_yet_valid"),  # 2020-01-01: no RTC, no NTP yet
    ("unset_epoch", 0, TTL, "not_yet_valid"),
    ("ahead_2_years", NOW + 730 * DAY, TTL, "expired"),
    ("behind_within_skew", NOW - 200, TTL, None),
    ("behind_at_skew", NOW - DEFAULT_CLOCK_SKEW_S, TTL, None),
    ("behind_past_skew", NOW - DEFAULT_CLOCK_SKEW_S - 1, TTL, "not_yet_valid"),
    ("behind_400s", NOW - 400, TTL, "not_yet_valid"),
    ("past_expiry_within_skew", NOW + 60 + 260, 60, None),
    ("past_expiry_at_skew", NOW + 60 + DEFAULT_CLOCK_SKEW_S, 60, None),
    ("past_expiry_past_skew", NOW + 60 + DEFAULT_CLOCK_SKEW_S + 1, 60, "expired"),
    ("past_expiry_400s", NOW + 60 + 400, 60, "expired"),
]


@pytest.fixture(scope="module")
def key(tmp_path_factory: pytest.TempPathFactory) -> tuple[Ed25519PrivateKey, dict[str, Any]]:
    from agent.updates.manifest import load_private_key, load_trusted_keys

    kp = generate_keypair(tmp_path_factory.mktemp("keys"), "k1")
    return load_private_key(kp.private_path), load_trusted_keys({"k1": kp.public_b64})


@pytest.mark.parametrize(("case", "now", "ttl", "expected"), CASES, ids=[c[0] for c in CASES])
def test_the_decision(case: str, now: int, ttl: int, expected: str | None,
                      key: tuple[Ed25519PrivateKey, dict[str, Any]]) -> None:
    priv, trusted = key
    raw = signed_bytes(make_manifest(now=NOW, ttl=ttl), priv)
    if expected is None:
        assert verify_manifest(raw, trusted, "dev1", now=now).model.version == "2"
        return
    with pytest.raises(UpdateError) as ei:
        verify_manifest(raw, trusted, "dev1", now=now)
    assert ei.value.reason == expected
    detail = ei.value.detail
    if now < CLOCK_UNSET_BEFORE:
        assert "clock looks unset" in detail
    elif expected == "not_yet_valid":
        assert f"issued at {NOW}" in detail and f"now {now}" in detail
    else:
        assert f"expired at {NOW + ttl}" in detail and f"now {now}" in detail


# ---- the manager: what the device reports, and what it does next ---------------------------------

@pytest.fixture
def skewed(tmp_path: Path) -> Iterator[dict[str, Any]]:
    """An UpdateManager whose clock the test sets (`env["now"][0]`); everything else as on a device."""
    from agent.updates.manifest import load_private_key

    kp = generate_keypair(tmp_path / "keys", "ops")
    cfg = UpdatesConfig(models_dir=tmp_path / "models", trusted_keys={"ops": kp.public_b64}, health_window_s=0.3,
                        download_timeout_s=2.0)
    bus, host = Bus(), FakeHost()
    store = ModelStore(cfg.models_dir, cfg.keep_versions)
    store.recover()
    now = [time.time()]
    mgr = UpdateManager(cfg, "dev1", Topics("edge", "dev1"), bus, store, host, clock=lambda: now[0])
    mgr.start()
    try:
        yield {"bus": bus, "host": host, "store": store, "mgr": mgr, "now": now, "tmp": tmp_path,
               "key": load_private_key(kp.private_path)}
    finally:
        mgr.stop()


def _manifest(env: dict[str, Any], manifest_id: str) -> bytes:
    p = model_file(env["tmp"])
    m = make_manifest(p.read_bytes(), now=int(time.time()), url=p.as_uri(), manifest_id=manifest_id)
    return signed_bytes(m, env["key"], "ops")


@pytest.mark.parametrize(("offset", "reason", "says"), [
    (-730 * DAY, "not_yet_valid", "issued at"),
    (None, "not_yet_valid", "clock looks unset"),
    (730 * DAY, "expired", "expired at"),
])
def test_a_refused_manifest_is_reported_and_changes_nothing(skewed: dict[str, Any], offset: int | None,
                                                            reason: str, says: str) -> None:
    skewed["now"][0] = 1_577_836_800.0 if offset is None else time.time() + offset
    skewed["bus"].deliver("edge/dev1/model/update", _manifest(skewed, "clock-test-0001"))
    s = wait_state(skewed["bus"], lambda s: s["state"] == "failed")
    assert (s["error"], s["manifest_id"]) == (reason, "clock-test-0001") and says in s["detail"], s
    assert [e["reason"] for e in skewed["bus"].events() if e["event"] == "update_rejected"] == [reason]
    assert skewed["host"].activated == [] and skewed["host"].current == ("demo", "1")  # the old model serves
    assert skewed["store"].installed_versions() == [] and skewed["store"].desired() is None


def test_after_the_clock_is_set_the_same_manifest_is_accepted(skewed: dict[str, Any]) -> None:
    """A refusal for time does not mark the manifest as seen: once NTP set the clock, a re-push (or
    a retained group manifest delivered again at reconnect) goes through."""
    raw = _manifest(skewed, "clock-test-0002")
    skewed["now"][0] = 1_577_836_800.0  # booted without a clock
    skewed["bus"].deliver("edge/dev1/model/update", raw)
    wait_state(skewed["bus"], lambda s: s["state"] == "failed")
    skewed["now"][0] = time.time()  # NTP
    skewed["bus"].deliver("edge/dev1/model/update", raw)
    wait_state(skewed["bus"], lambda s: s["state"] == "active")
    assert skewed["mgr"].wait_idle(5)
    assert skewed["host"].current == ("widgets", "2")
    states = [(s["state"], s.get("error")) for s in skewed["bus"].states()]
    # the refusal is reported beside what serves (one record), then the accepted attempt runs
    assert states[:2] == [("failed", "not_yet_valid"), ("received", None)] and states[-1][0] == "active"


def test_a_clock_that_jumps_while_queued_is_checked_again(skewed: dict[str, Any]) -> None:
    """Accepted on arrival, refused when the worker takes it: the check runs again in the worker."""
    block = threading.Event()
    skewed["host"].gate = block
    first = _manifest(skewed, "clock-test-0003")
    skewed["bus"].deliver("edge/dev1/model/update", first)  # runs, and blocks in prepare_engine
    wait_state(skewed["bus"], lambda s: s["state"] == "building")
    p = model_file(skewed["tmp"], "3")
    second = signed_bytes(make_manifest(p.read_bytes(), now=int(time.time()), url=p.as_uri(), version="3",
                                        manifest_id="clock-test-0004"), skewed["key"], "ops")
    skewed["bus"].deliver("edge/dev1/model/update", second)  # accepted, queued behind the first
    skewed["now"][0] = time.time() + 730 * DAY  # the clock jumps two years ahead
    block.set()
    s = wait_state(skewed["bus"], lambda s: s.get("manifest_id") == "clock-test-0004" and s["state"] == "failed")
    assert s["error"] == "expired", s
    assert skewed["host"].current == ("widgets", "2")  # the first update went through, the second did not
