"""The inspection handshake's pure parts: request parsing, recipe judgement, the result payload.

Data flow: a trigger's payload -> `parse_request` (an id, a recipe name, a deadline, or a
`RequestError` with the reason a PLC gets back under code 4) -> for each fresh frame's Result,
`judge_frame` (counts per label after the recipe's score and ROI filters, pass / fail, or a rule
error) -> `vote` over the recipe's N frames -> `result_payload`, the compact ASCII JSON with fixed
keys that every answer carries. Nothing here touches MQTT, threads or clocks
(agent/plc/inspection.py does), so every rule is testable on its own.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from enum import IntEnum

from agent.config import InspectionRecipeConfig
from agent.publish import dumps
from agent.vision.types import Result

MAX_ID = 65535  # the ID is a uint16 on the PLC side; 0 is reserved for "no valid id" in rejections
MAX_VALUE_CHARS = 256  # Siemens LStream's limit per JSON value
_DECIMAL = re.compile(r"^[0-9]{1,5}$")
_RECIPE = re.compile(r"^[A-Za-z0-9_.-]{1,32}$")
_REQUEST_KEYS = {"id", "recipe", "deadline_ms"}


class Code(IntEnum):
    """Result codes (docs/plc.md). Negative: the recipe could not be applied."""

    OK = 0
    BUSY = 1
    TIMEOUT = 2
    NO_FRAME = 3
    REJECTED = 4
    RULE_UNKNOWN_LABEL = -1  # the recipe names a label the active model does not have
    RULE_FAILED = -2  # evaluating the recipe raised (a bug; logged with its traceback)


class RequestError(ValueError):
    """A request that cannot be served; `reason` goes back to the PLC, `id` is kept when it was readable."""

    def __init__(self, reason: str, id_: int = 0) -> None:
        super().__init__(reason)
        self.reason = reason
        self.id = id_


@dataclass(frozen=True)
class Request:
    id: int | None  # None: an MQTT 5 request without one (the agent numbers it)
    recipe: str | None  # None: the camera's default recipe
    deadline_ms: int | None  # None: the Message Expiry or the configured deadline


def _parse_id(text: str) -> int:
    if not _DECIMAL.match(text):
        raise RequestError(f"id must be decimal ASCII 1-{MAX_ID}, got {_shown(text)}")
    value = int(text)
    if not 1 <= value <= MAX_ID:
        raise RequestError(f"id must be 1-{MAX_ID}, got {value}")
    return value


def _shown(text: str, limit: int = 24) -> str:
    """A short, ASCII-only rendering of untrusted text for a reason string."""
    out = ascii(text[:limit])
    return out + ("..." if len(text) > limit else "")


def parse_request(payload: bytes, max_bytes: int, *, need_id: bool) -> Request:
    """A trigger payload: `17`, `17,recipe`, a JSON object {"id", "recipe", "deadline_ms"}, or (MQTT 5,
    `need_id` false) nothing at all. Trailing spaces, CR / LF and NULs (fixed-size PLC strings) are ignored."""
    if len(payload) > max_bytes:
        raise RequestError(f"request too large ({len(payload)} bytes > {max_bytes})")
    try:
        text = payload.decode("ascii").rstrip(" \t\r\n\x00")
    except UnicodeDecodeError:
        raise RequestError("request is not ASCII text") from None
    if not text:
        if need_id:
            raise RequestError(f"empty trigger: send the inspection id, 1-{MAX_ID}")
        return Request(None, None, None)
    if text[0] in "{[":
        return _parse_json(text, need_id)
    id_text, sep, recipe = text.partition(",")
    id_ = _parse_id(id_text.strip())
    if sep and not _RECIPE.match(recipe.strip()):
        raise RequestError(f"recipe name must match {_RECIPE.pattern}, got {_shown(recipe.strip())}", id_)
    return Request(id_, recipe.strip() if sep else None, None)


def _parse_json(text: str, need_id: bool) -> Request:
    try:
        obj = json.loads(text)
    except (ValueError, RecursionError):
        raise RequestError("request is neither a decimal id nor valid JSON") from None
    if not isinstance(obj, dict):
        raise RequestError("a JSON request must be an object")
    raw_id = obj.get("id")
    id_: int | None = None
    if raw_id is not None:
        if isinstance(raw_id, bool) or not isinstance(raw_id, int):
            raise RequestError(f"id must be an integer 1-{MAX_ID}")
        if not 1 <= raw_id <= MAX_ID:
            raise RequestError(f"id must be 1-{MAX_ID}, got {raw_id if abs(raw_id) < 10**9 else 'a huge number'}")
        id_ = raw_id
    elif need_id:
        raise RequestError("a trigger needs an id")
    unknown = sorted(set(obj) - _REQUEST_KEYS)
    if unknown:
        raise RequestError(f"unknown key {_shown(unknown[0])} (known: deadline_ms, id, recipe)", id_ or 0)
    recipe = obj.get("recipe")
    if recipe is not None and (not isinstance(recipe, str) or not _RECIPE.match(recipe)):
        raise RequestError(f"recipe name must match {_RECIPE.pattern}", id_ or 0)
    deadline = obj.get("deadline_ms")
    if deadline is not None and (isinstance(deadline, bool) or not isinstance(deadline, int)
                                 or not 1 <= deadline <= 60000):
        raise RequestError("deadline_ms must be an integer 1-60000", id_ or 0)
    return Request(id_, recipe, deadline)


# ---- judging ------------------------------------------------------------------------------------
@dataclass
class FrameVerdict:
    passed: bool
    counts: dict[str, int]
    ts: float
    model_version: str
    code: Code = Code.OK
    reason: str = ""


def listed_labels(recipe: InspectionRecipeConfig) -> list[str]:
    return [*recipe.counts, *recipe.forbidden]


def count_objects(recipe: InspectionRecipeConfig, result: Result) -> dict[str, int]:
    """Objects per label that the recipe sees: score >= min_score and the box centre inside the ROI."""
    counts: dict[str, int] = {}
    w, h = max(1, result.frame_w), max(1, result.frame_h)
    for det in result.detections:
        if det.score < recipe.min_score:
            continue
        if recipe.roi is not None:
            cx = (det.box[0] + det.box[2]) / 2 / w
            cy = (det.box[1] + det.box[3]) / 2 / h
            x1, y1, x2, y2 = recipe.roi
            if not (x1 <= cx <= x2 and y1 <= cy <= y2):
                continue
        counts[det.label] = counts.get(det.label, 0) + 1
    return counts


def judge_frame(recipe: InspectionRecipeConfig, result: Result, model_labels: list[str]) -> FrameVerdict:
    """One frame against one recipe. `model_labels` empty: unknown, not checked."""
    listed = listed_labels(recipe)
    if model_labels:
        unknown = [lab for lab in listed if lab not in model_labels]
        if unknown:
            return FrameVerdict(False, {}, result.ts, result.model_version, Code.RULE_UNKNOWN_LABEL,
                                f"label {unknown[0]!r} unknown to model {result.model_name} v{result.model_version}")
    seen = count_objects(recipe, result)
    counts = {lab: seen.get(lab, 0) for lab in listed} if listed else dict(sorted(seen.items()))
    failures = []
    for label, rng in recipe.counts.items():
        n = counts[label]
        if n < rng.min:
            failures.append(f"{label} {n}<{rng.min}")
        elif rng.max is not None and n > rng.max:
            failures.append(f"{label} {n}>{rng.max}")
    failures += [f"{label} {counts[label]} forbidden" for label in recipe.forbidden if counts[label]]
    return FrameVerdict(not failures, counts, result.ts, result.model_version, Code.OK, "; ".join(failures))


def vote(verdicts: list[FrameVerdict]) -> FrameVerdict:
    """The majority verdict (a tie fails); its counts and time stamp are the last agreeing frame's."""
    errors = [v for v in verdicts if v.code != Code.OK]
    if errors:
        return errors[-1]
    passed = sum(v.passed for v in verdicts) * 2 > len(verdicts)
    return next(v for v in reversed(verdicts) if v.passed == passed)


# ---- the answer ---------------------------------------------------------------------------------
@dataclass
class Outcome:
    """What one answer says; `result_payload` turns it into the wire form."""

    id: int
    code: Code
    passed: bool = False
    counts: dict[str, int] = field(default_factory=dict)
    ms: float = 0.0
    model: str = ""
    ts: float = 0.0
    recipe: str = ""
    reason: str = ""


# Some PLC JSON parsers (simatic-ax/json, for one) cannot take these inside a string value
_PLAIN = str.maketrans({",": ";", ":": "=", '"': "'", "[": "(", "]": ")", "{": "(", "}": ")", "\\": "/"})


def _ascii_cut(text: str, limit: int) -> str:
    """ASCII, without JSON punctuation or control characters, at most `limit` characters."""
    clean = "".join(ch if " " <= ch <= "~" else "?" for ch in text).translate(_PLAIN)
    return clean if len(clean) <= limit else clean[: limit - 3] + "..."


def _counts_value(counts: dict[str, int]) -> dict[str, int]:
    """Counts in their given order, cut to what fits in 256 characters (only unlisted labels can overflow)."""
    out: dict[str, int] = {}
    for label, n in counts.items():
        trial = {**out, _ascii_cut(label, 64): n}
        if len(dumps(trial, ascii_only=True)) > MAX_VALUE_CHARS:
            break
        out = trial
    return out


def result_payload(o: Outcome, overrun: bool) -> str:
    """Compact ASCII JSON, the same keys in the same order every time, each value <= 256 characters."""
    return dumps({
        "id": o.id,
        "code": int(o.code),
        "pass": bool(o.passed and o.code == Code.OK),
        "counts": _counts_value(o.counts),
        "ms": round(o.ms, 1),
        "model": _ascii_cut(o.model, 32),
        "ts": round(o.ts, 6),
        "recipe": _ascii_cut(o.recipe, 32),
        "overrun": overrun,
        "reason": _ascii_cut(o.reason, 200),
    }, ascii_only=True)


__all__ = ["Code", "FrameVerdict", "Outcome", "Request", "RequestError", "count_objects", "judge_frame",
           "parse_request", "result_payload", "vote"]
