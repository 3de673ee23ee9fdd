"""Hostile manifests (tests/support/attacks.py): against `verify_manifest` directly, and against a live agent.

The parser cases here are the corpus's cases that tests/updates/test_manifest.py does not already cover
one by one; the live run sends the whole corpus over MQTT to a real agent and checks that every case is
rejected and reported on `edge/<dev>/events`, that nothing is written anywhere, and that the model
serving does not change.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.errors import UpdateError
from agent.updates.manifest import Manifest, verify_manifest
from tests.support.attacks import Attack, Campaign, CorpusSpec, build_corpus, controls, run_campaign

SPEC = CorpusSpec(Ed25519PrivateKey.generate(), "ops", Ed25519PrivateKey.generate(), "ops-2025")
CORPUS = build_corpus(SPEC)
NEW_CASES = [a for a in CORPUS if not a.unit_dup]


def verify(raw: bytes) -> Manifest:
    return verify_manifest(raw, {SPEC.key_id: SPEC.key.public_key()}, SPEC.device, [SPEC.group],
                           current_version=SPEC.current_version, seen_ids=set(), now=SPEC.now,
                           max_model_bytes=SPEC.max_model_bytes)


@pytest.mark.parametrize("attack", NEW_CASES, ids=[a.name for a in NEW_CASES])
def test_parser_rejects_attack(attack: Attack) -> None:
    with pytest.raises(UpdateError) as ei:
        verify(attack.raw)
    assert ei.value.reason in attack.expect, (ei.value.reason, ei.value.detail)


@pytest.mark.parametrize("name,raw", controls(SPEC), ids=[n for n, _ in controls(SPEC)])
def test_equivalent_encodings_are_accepted(name: str, raw: bytes) -> None:
    """Whitespace, key order and \\u escapes do not change the meaning the signature covers."""
    assert verify(raw).model.name == SPEC.name


def test_corpus_is_broad_and_its_unit_duplicates_are_named() -> None:
    cats = {a.category for a in CORPUS}
    assert cats >= {"json", "encoding", "numbers", "types", "size", "nesting", "traversal", "replay", "keys",
                    "time", "downgrade"}, cats
    assert len(CORPUS) >= 70
    src = (Path(__file__).parent / "test_manifest.py").read_text()
    for a in CORPUS:
        assert not a.unit_dup or f"def {a.unit_dup}(" in src, a.unit_dup


def test_schema_must_be_the_integer_one() -> None:
    """`"schema": true` passed `Literal[1]` (True == 1 in Python) before the fix in manifest.py."""
    with pytest.raises(UpdateError, match="not a boolean"):
        verify(next(a.raw for a in CORPUS if a.name == "schema_true"))


@pytest.fixture(scope="module")
def campaign(tmp_path_factory: pytest.TempPathFactory) -> Campaign:
    return run_campaign(tmp_path_factory.mktemp("campaign"))


def test_live_agent_rejects_and_reports_every_attack(campaign: Campaign) -> None:
    c = campaign
    assert c.published == sum(a.mqtt for a in CORPUS) + 2
    assert not c.accepted, c.log_tail
    assert not c.unreported, c.log_tail
    assert not c.wrong_reason
    assert c.telemetry_rejected == sum(a.mqtt for a in CORPUS)
    assert c.agent_alive


def test_live_agent_writes_nothing_and_keeps_its_model(campaign: Campaign) -> None:
    c = campaign
    assert c.tree_changes == []
    assert c.stray_paths == []
    assert c.served_after == {"1"} and c.status_after == "1"


def test_live_agent_refuses_tampered_chunks_and_still_takes_a_genuine_update(campaign: Campaign) -> None:
    c = campaign
    assert c.tampered_reason == "checksum_mismatch"
    assert c.outside_store_changes == [] and not c.tampered_versions_changed
    assert c.control_state == "active", c.log_tail
    assert c.replay_reasons == ["replayed", "replayed"]


def test_parser_and_agent_agree(campaign: Campaign) -> None:
    assert not campaign.parser_accepted
    assert not campaign.controls_refused
    for o in campaign.outcomes:
        if o.name in campaign.parser:
            assert o.reason == campaign.parser[o.name], o.name
