"""Sparkplug B payloads and topics: plain Python values in, protobuf bytes out (and back).

Data flow: the edge node (agent/plc/sparkplug.py) keeps every metric as a plain value (bool, int,
float, str) with a name, an alias and a datatype fixed at birth. This module turns them into the
protobuf `Payload` of agent/plc/sparkplug_b.proto: BIRTH metrics carry name + alias + datatype +
value, DATA metrics the alias + datatype + value only, the NDEATH (the MQTT will) one `bdSeq`
metric by name and no `seq`. Every payload and every metric carries a UTC millisecond timestamp.
`decode_value` reads a metric back (the node's NCMD handler and the tests' host-side checker).

Python -> Sparkplug datatypes: bool -> Boolean, int -> Int64, float -> Double, str -> String.
Signed integers travel as two's complement in the unsigned protobuf fields, as the spec says.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from dataclasses import dataclass
from enum import IntEnum

try:
    from agent.plc import sparkplug_b_pb2 as pb
except Exception as exc:  # protobuf missing, or older than the generated code needs (its VersionError)
    raise ImportError(f"Sparkplug B needs protobuf >= 6.31.1 (pip install 'edge-agent[sparkplug]'): {exc}") from exc

NAMESPACE = "spBv1.0"
BDSEQ = "bdSeq"
REBIRTH = "Node Control/Rebirth"

# a metric's value as the node and the PLC components hand it over
MetricValue = bool | int | float | str

_U32 = 1 << 32
_U64 = 1 << 64


class DataType(IntEnum):
    """The Sparkplug B datatype numbers this node uses or reads (the full list is in the .proto)."""

    Int8 = 1
    Int16 = 2
    Int32 = 3
    Int64 = 4
    UInt8 = 5
    UInt16 = 6
    UInt32 = 7
    UInt64 = 8
    Float = 9
    Double = 10
    Boolean = 11
    String = 12
    DateTime = 13
    Text = 14


_SIGNED_32 = {DataType.Int8, DataType.Int16, DataType.Int32}
_UNSIGNED_32 = {DataType.UInt8, DataType.UInt16, DataType.UInt32}
_SIGNED_BITS = {int(DataType.Int8): 8, int(DataType.Int16): 16, int(DataType.Int32): 32}


def now_ms() -> int:
    return int(time.time() * 1000)


def datatype_of(value: object) -> DataType:
    """The datatype a plain value is born with; TypeError for anything that is not bool/int/float/str."""
    if isinstance(value, bool):  # before int: bool is an int in Python
        return DataType.Boolean
    if isinstance(value, int):
        if not -(1 << 63) <= value < (1 << 63):
            raise TypeError(f"integer {value} does not fit Int64")
        return DataType.Int64
    if isinstance(value, float):
        return DataType.Double
    if isinstance(value, str):
        return DataType.String
    raise TypeError(f"a metric value must be bool, int, float or str, not {type(value).__name__}")


def coerce(value: MetricValue, datatype: DataType) -> MetricValue:
    """`value` as the born datatype wants it (an int for a Double metric becomes a float); TypeError if it cannot."""
    have = datatype_of(value)
    if have == datatype:
        return value
    if datatype == DataType.Double and have == DataType.Int64:
        return float(value)
    raise TypeError(f"a {have.name} value for a metric born {datatype.name}")


def _set_value(m: pb.Payload.Metric, datatype: DataType, value: MetricValue) -> None:
    if datatype == DataType.Boolean:
        m.boolean_value = bool(value)
    elif datatype in (DataType.Int64, DataType.UInt64, DataType.DateTime):
        m.long_value = int(value) % _U64
    elif datatype in _SIGNED_32 or datatype in _UNSIGNED_32:
        m.int_value = int(value) % _U32
    elif datatype == DataType.Double:
        m.double_value = float(value)
    elif datatype == DataType.Float:
        m.float_value = float(value)
    elif datatype in (DataType.String, DataType.Text):
        m.string_value = str(value)
    else:
        raise TypeError(f"datatype {datatype} is not written by this node")


def decode_value(m: pb.Payload.Metric) -> MetricValue | None:
    """A metric's value as Python (signed types sign-extended); None for is_null or an unread datatype."""
    if m.is_null:
        return None
    kind = m.WhichOneof("value")
    if kind is None:
        return None
    dt = m.datatype
    if kind == "long_value":
        v = m.long_value
        return v - _U64 if dt == DataType.Int64 and v >= (1 << 63) else v
    if kind == "int_value":
        v = m.int_value
        bits = _SIGNED_BITS.get(dt)
        if bits is not None:
            v &= (1 << bits) - 1
            return v - (1 << bits) if v >= (1 << (bits - 1)) else v
        return v
    if kind in ("double_value", "float_value", "boolean_value", "string_value"):
        value: MetricValue = getattr(m, kind)
        return value
    return None


def same_value(a: MetricValue | None, b: MetricValue | None, deadband: float = 0.0) -> bool:
    """Report-by-exception test: equal (floats within the deadband; NaN equals NaN)."""
    if isinstance(a, float) and isinstance(b, float):
        if math.isnan(a) or math.isnan(b):
            return math.isnan(a) and math.isnan(b)
        return a == b or abs(a - b) < deadband
    return type(a) is type(b) and a == b


@dataclass(frozen=True)
class Out:
    """One metric to encode: `name` only in BIRTH (and NDEATH), `alias` None only for Node Control/Rebirth."""

    name: str | None
    alias: int | None
    datatype: DataType
    value: MetricValue
    ts: int


def encode(metrics: Iterable[Out], seq: int | None, ts: int | None = None) -> bytes:
    """A serialised Payload: its timestamp, `seq` (None: none, for NDEATH) and the metrics in order."""
    p = pb.Payload()
    p.timestamp = now_ms() if ts is None else ts
    if seq is not None:
        p.seq = seq
    for o in metrics:
        m = p.metrics.add()
        if o.name is not None:
            m.name = o.name
        if o.alias is not None:
            m.alias = o.alias
        m.timestamp = o.ts
        m.datatype = int(o.datatype)
        _set_value(m, o.datatype, o.value)
    return p.SerializeToString()


def death_payload(bdseq: int, ts: int | None = None) -> bytes:
    """The NDEATH: the bdSeq metric by name (Int64), a timestamp, no seq."""
    t = now_ms() if ts is None else ts
    return encode([Out(BDSEQ, None, DataType.Int64, bdseq, t)], seq=None, ts=t)


def decode(data: bytes) -> pb.Payload:
    """Parse a Payload; raises ValueError on bytes that are not one."""
    p = pb.Payload()
    try:
        p.ParseFromString(data)
    except Exception as exc:  # protobuf's DecodeError, or a RuntimeWarning-free failure of the upb parser
        raise ValueError(f"not a Sparkplug B payload: {exc}") from None
    return p


@dataclass(frozen=True)
class SparkplugTopics:
    """spBv1.0/<group>/<VERB>/<edge node>[/<device>] and spBv1.0/STATE/<host id>."""

    group: str
    node: str

    def node_topic(self, verb: str) -> str:
        return f"{NAMESPACE}/{self.group}/{verb}/{self.node}"

    def device_topic(self, verb: str, device: str) -> str:
        return f"{NAMESPACE}/{self.group}/{verb}/{self.node}/{device}"

    @staticmethod
    def state(host_id: str) -> str:
        return f"{NAMESPACE}/STATE/{host_id}"


__all__ = [
    "BDSEQ", "NAMESPACE", "REBIRTH", "DataType", "MetricValue", "Out", "SparkplugTopics", "coerce", "datatype_of",
    "death_payload", "decode", "decode_value", "encode", "now_ms", "same_value",
]
