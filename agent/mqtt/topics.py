"""MQTT topic names (DESIGN.md, "MQTT topics": a contract; change only with a changelog entry).

Prefix `edge` (configurable), device id `D`, camera id `C`:

    edge/D/status                               out  1, retained; also the last will
    edge/D/C/detections                         out  configurable
    edge/D/C/count/<label>                      out  1, retained
    edge/D/telemetry                            out  0
    edge/D/events                               out  1
    edge/D/model/state                          out  1, retained
    edge/D/C/inspect                            in   1 (MQTT 5 request: Response Topic + Correlation Data)
    edge/D/C/inspect/trigger                    in   1 (MQTT 3.1.1: decimal ASCII id 1-65535)
    edge/D/C/inspect/ack                        out  1 (the id, echoed at once)
    edge/D/C/inspect/result                     out  1 (result JSON; MQTT 5 answers go to the Response Topic)
    edge/D/C/inspect/last/<field>               out  1, retained (optional: id, code, pass, ms, count/<label>)
    edge/D/C/line/<name>/in | out               out  1, retained (uint32 counter, decimal; also .../in/<label>)
    edge/D/C/line/<name>/event                  out  1 (one JSON per crossing, with a seq)
    edge/D/C/line/<name>/reset                  in   1 (reset that line's counters; reply on .../reset/reply)
    edge/D/C/zone/<name>/count                  out  1, retained (objects inside now; also .../count/<label>)
    edge/D/model/update                         in   1
    edge/group/G/model/update                   in   1 (may be retained)
    edge/D/model/chunks/<transfer>/<index>      in   1
    edge/group/G/model/chunks/<transfer>/<index> in  1

A device whose id is literally `group` would share its level with group topics; the config's
device-id pattern allows it, so operators should not name a device `group`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_LABEL_BAD = re.compile(r"[+#/\x00-\x1f\x7f-\x9f\u2028\u2029]")
_LEVEL_BAD = re.compile(r"[+#/\x00-\x1f\x7f]")  # what a given id / name may not hold (not rewritten)
_INDEX = re.compile(r"^(0|[1-9][0-9]{0,8})$")


def sanitize_level(text: str) -> str:
    """One topic level from free text: wildcards, separators and control characters become `_`."""
    out = _LABEL_BAD.sub("_", text)
    return out if out else "_"


def _check_level(what: str, value: str) -> str:
    if not value or _LEVEL_BAD.search(value):
        raise ValueError(f"{what} {value!r} is not a valid single topic level")
    return value


@dataclass(frozen=True)
class Topics:
    """Every topic of one device. Properties for fixed topics, methods for parametrised ones."""

    prefix: str
    device_id: str

    def __post_init__(self) -> None:
        if not self.prefix or any(ch in self.prefix for ch in "+#") or self.prefix.startswith("/") \
                or self.prefix.endswith("/"):
            raise ValueError(f"topic prefix {self.prefix!r} is not valid")
        _check_level("device id", self.device_id)

    @property
    def base(self) -> str:
        return f"{self.prefix}/{self.device_id}"

    # -- outgoing -------------------------------------------------------------------------------
    @property
    def status(self) -> str:
        return f"{self.base}/status"

    def detections(self, camera: str) -> str:
        return f"{self.base}/{_check_level('camera id', camera)}/detections"

    def count(self, camera: str, label: str) -> str:
        """Per-label count topic; the label is sanitised (no `+ # /`, no control characters)."""
        return f"{self.base}/{_check_level('camera id', camera)}/count/{sanitize_level(label)}"

    @property
    def telemetry(self) -> str:
        return f"{self.base}/telemetry"

    @property
    def events(self) -> str:
        return f"{self.base}/events"

    @property
    def model_state(self) -> str:
        return f"{self.base}/model/state"

    # -- inspection handshake (agent/plc/inspection.py) ------------------------------------------
    def inspect(self, camera: str) -> str:
        """In: MQTT 5 requests (Response Topic + Correlation Data)."""
        return f"{self.base}/{_check_level('camera id', camera)}/inspect"

    def inspect_trigger(self, camera: str) -> str:
        """In: MQTT 3.1.1 triggers, the inspection id in decimal ASCII."""
        return f"{self.inspect(camera)}/trigger"

    def inspect_ack(self, camera: str) -> str:
        return f"{self.inspect(camera)}/ack"

    def inspect_result(self, camera: str) -> str:
        return f"{self.inspect(camera)}/result"

    def inspect_last(self, camera: str, field: str) -> str:
        """Retained single values: `id`, `code`, `pass`, `ms`, or `count/<label>` (label sanitised)."""
        if field.startswith("count/"):
            return f"{self.inspect(camera)}/last/count/{sanitize_level(field[len('count/'):])}"
        return f"{self.inspect(camera)}/last/{_check_level('field', field)}"

    # -- zones and counting lines (agent/plc/counting.py) ---------------------------------------
    def line(self, camera: str, name: str) -> str:
        return f"{self.base}/{_check_level('camera id', camera)}/line/{_check_level('line name', name)}"

    def line_count(self, camera: str, name: str, direction: str, label: str | None = None) -> str:
        """Retained counter: `direction` is `in` or `out`; a label adds one level (sanitised)."""
        if direction not in ("in", "out"):
            raise ValueError(f"direction must be 'in' or 'out', got {direction!r}")
        tail = "" if label is None else f"/{sanitize_level(label)}"
        return f"{self.line(camera, name)}/{direction}{tail}"

    def line_event(self, camera: str, name: str) -> str:
        return f"{self.line(camera, name)}/event"

    def line_reset_filter(self, camera: str) -> str:
        """In: a request on .../line/<name>/reset resets that line's counters."""
        return f"{self.base}/{_check_level('camera id', camera)}/line/+/reset"

    def line_reset_reply(self, camera: str, name: str) -> str:
        return f"{self.line(camera, name)}/reset/reply"

    def zone_count(self, camera: str, name: str, label: str | None = None) -> str:
        tail = "" if label is None else f"/{sanitize_level(label)}"
        return f"{self.base}/{_check_level('camera id', camera)}/zone/{_check_level('zone name', name)}/count{tail}"

    # -- incoming -------------------------------------------------------------------------------
    @property
    def model_update(self) -> str:
        return f"{self.base}/model/update"

    def group_model_update(self, group: str) -> str:
        return f"{self.prefix}/group/{_check_level('group', group)}/model/update"

    def chunks(self, transfer_id: str, index: int) -> str:
        """The topic of one chunk sent to this device (the operator side publishes here)."""
        if index < 0:
            raise ValueError(f"chunk index must be >= 0, got {index}")
        return f"{self.base}/model/chunks/{_check_level('transfer id', transfer_id)}/{index}"

    def group_chunks(self, group: str, transfer_id: str, index: int) -> str:
        """The topic of one chunk sent to a group."""
        if index < 0:
            raise ValueError(f"chunk index must be >= 0, got {index}")
        return (f"{self.prefix}/group/{_check_level('group', group)}/model/chunks/"
                f"{_check_level('transfer id', transfer_id)}/{index}")

    def chunk_filter(self) -> str:
        return f"{self.base}/model/chunks/+/+"

    def group_chunk_filter(self, group: str) -> str:
        return f"{self.prefix}/group/{_check_level('group', group)}/model/chunks/+/+"

    def parse_chunk_topic(self, topic: str) -> tuple[str, int] | None:
        """(transfer_id, index) of a device or group chunk topic under this prefix, else None."""
        head = self.prefix + "/"
        if not topic.startswith(head):
            return None
        parts = topic[len(head):].split("/")
        if len(parts) == 5 and parts[0] == self.device_id:
            rest = parts[1:]
        elif len(parts) == 6 and parts[0] == "group" and parts[1]:
            rest = parts[2:]
        else:
            return None
        if rest[0] != "model" or rest[1] != "chunks" or not rest[2] or not _INDEX.match(rest[3]):
            return None
        return rest[2], int(rest[3])
