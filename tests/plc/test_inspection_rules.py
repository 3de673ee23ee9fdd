"""Request parsing, recipe judgement, voting and the result payload (agent/plc/inspection_rules.py)."""

from __future__ import annotations

import json

import pytest

from agent.config import InspectionConfig, InspectionRecipeConfig, parse_config
from agent.errors import ConfigError
from agent.plc.inspection_rules import (
    Code,
    FrameVerdict,
    Outcome,
    Request,
    RequestError,
    judge_frame,
    parse_request,
    result_payload,
    vote,
)
from agent.vision.types import Detection, Result


def result(*dets: tuple[str, float, tuple[float, float, float, float]], ts: float = 100.0) -> Result:
    return Result(frame_seq=1, ts=ts, mono=0.0, frame_w=200, frame_h=100,
                  detections=[Detection(0, label, score, box) for label, score, box in dets],
                  model_name="m", model_version="3")


@pytest.mark.parametrize(("payload", "need_id", "expected"), [
    (b"17", True, Request(17, None, None)),
    (b"00017\x00\x00\r\n", True, Request(17, None, None)),  # a fixed-size PLC string, NUL padded
    (b"65535,bottle-2", True, Request(65535, "bottle-2", None)),
    (b'{"id":1,"recipe":"a","deadline_ms":250}', True, Request(1, "a", 250)),
    (b"", False, Request(None, None, None)),
    (b'{"recipe":"a"}', False, Request(None, "a", None)),
])
def test_parse_good(payload: bytes, need_id: bool, expected: Request) -> None:
    assert parse_request(payload, 512, need_id=need_id) == expected


@pytest.mark.parametrize(("payload", "why", "id_"), [
    (b"0", "1-65535", 0),
    (b"65536", "1-65535", 0),
    (b"123456", "decimal", 0),
    (b"5 6", "decimal", 0),
    (b"x" * 600, "too large", 0),
    (b"\xc3\xa9", "ASCII", 0),
    (b"", "empty", 0),
    (b"7,", "recipe name", 7),
    (b'{"recipe":"a"}', "needs an id", 0),
    (b"[1]", "object", 0),
    (b'{"id":1e3}', "integer", 0),
    (b'{"id":99999999999999999999999}', "huge", 0),
    (b'{"id":9,"recipe":5}', "recipe name", 9),
    pytest.param(b"[" * 5000, "JSON", 0, id="deep-nesting"),
])
def test_parse_bad(payload: bytes, why: str, id_: int) -> None:
    with pytest.raises(RequestError) as err:
        parse_request(payload, 512 if len(payload) < 1000 else 10_000, need_id=True)
    assert why in err.value.reason and err.value.id == id_
    assert err.value.reason.isascii() and len(err.value.reason) < 200


def test_counts_score_roi_and_verdicts() -> None:
    r = result(("part", 0.9, (10, 10, 30, 30)), ("part", 0.3, (100, 40, 120, 60)),
               ("scratch", 0.8, (150, 50, 170, 70)))
    recipe = InspectionRecipeConfig.model_validate({"counts": {"part": {"min": 2}}, "forbidden": ["scratch"]})
    v = judge_frame(recipe, r, ["part", "scratch", "dent"])
    assert (v.passed, v.counts, v.code) == (False, {"part": 2, "scratch": 1}, Code.OK)
    assert v.reason == "scratch 1 forbidden"
    filtered = InspectionRecipeConfig.model_validate(
        {"counts": {"part": {"min": 1, "max": 1}}, "forbidden": ["scratch"], "min_score": 0.5, "roi": [0, 0, 0.6, 1]})
    v = judge_frame(filtered, r, [])
    assert (v.passed, v.counts) == (True, {"part": 1, "scratch": 0})
    too_many = InspectionRecipeConfig.model_validate({"counts": {"part": {"max": 1}}})
    assert judge_frame(too_many, r, []).reason == "part 2>1"
    everything = InspectionRecipeConfig()  # no labels listed: every seen label, sorted, and a pass
    v = judge_frame(everything, r, [])
    assert v.passed and list(v.counts) == ["part", "scratch"]
    ghost = InspectionRecipeConfig.model_validate({"forbidden": ["cat"]})
    v = judge_frame(ghost, r, ["part", "scratch"])
    assert v.code == Code.RULE_UNKNOWN_LABEL and "cat" in v.reason


def test_vote_majority_tie_fails_and_errors_win() -> None:
    def fv(passed: bool, ts: float, code: Code = Code.OK) -> FrameVerdict:
        return FrameVerdict(passed, {"a": int(passed)}, ts, "1", code)

    assert vote([fv(True, 1), fv(False, 2), fv(True, 3)]).ts == 3
    assert vote([fv(True, 1), fv(False, 2), fv(False, 3), fv(True, 4)]).ts == 3  # a tie fails
    assert vote([fv(False, 1), fv(True, 2), fv(True, 3)]).passed
    assert vote([fv(True, 1), fv(False, 2, Code.RULE_FAILED)]).code == Code.RULE_FAILED


def test_payload_fixed_keys_ascii_and_bounded() -> None:
    many = {f"label_{i:02d}_{'x' * 20}": 65535 for i in range(40)}
    text = result_payload(Outcome(5, Code.OK, True, many, 12.345, "v" * 80, 1.5, "r", "é" * 400), overrun=True)
    obj = json.loads(text)
    assert list(obj) == ["id", "code", "pass", "counts", "ms", "model", "ts", "recipe", "overrun", "reason"]
    assert text.isascii() and " " not in text
    assert all(len(json.dumps(v)) <= 256 for v in obj.values())
    assert obj["ms"] == 12.3 and obj["overrun"] is True and 0 < len(obj["counts"]) < 40
    failed = json.loads(result_payload(Outcome(6, Code.TIMEOUT, True), overrun=False))
    assert failed["pass"] is False  # only an OK result can pass
    # no JSON punctuation inside string values: some PLC parsers split on it
    odd = json.loads(result_payload(Outcome(7, Code.REJECTED, reason='a: b, "c" [d] {e}\\\n'), overrun=False))
    assert odd["reason"] == "a= b; 'c' (d) (e)/?"


@pytest.mark.parametrize(("section", "error"), [
    ({"recipes": {"a": {}}}, "default_recipe 'default' is not among"),
    ({"recipes": {"a b": {}}, "default_recipe": "a"}, "recipe names must match"),
    ({"recipes": {"default": {"roi": [0.5, 0, 0.4, 1]}}}, "roi must be"),
    ({"recipes": {"default": {"counts": {"a": {"min": 3, "max": 2}}}}}, "max must be >= min"),
    ({"recipes": {"default": {"counts": {"a": {}}, "forbidden": ["a"]}}}, "both counted and forbidden"),
    ({"recipes": {"default": {"forbidden": [f"l{i}{'y' * 30}" for i in range(12)]}}}, "256 characters"),
    ({"recipes": {"default": {"frames": 16}}}, "less than or equal to 15"),
    ({"deadline_ms": 5}, "greater than or equal to 10"),
    ({"buffer": 8}, "unknown key"),
])
def test_config_errors_name_the_field(section: dict[str, object], error: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config({"cameras": [{"source": "synthetic:", "inspection": section}]})
    text = "\n".join(err.value.errors)
    assert "cameras[0].inspection" in text and error in text, text


def test_config_defaults() -> None:
    cfg = InspectionConfig()
    assert (cfg.buffer_size, cfg.deadline_ms, cfg.default_recipe, cfg.retained_fields) == (8, 1000, "default", False)
    assert list(cfg.recipes) == ["default"]
    for name, field in InspectionConfig.model_fields.items():
        assert field.description, name
