"""Content-derived cache keys: the same model, runtime, device and options always give the same key.

The key is the sha256 of the canonical JSON (sorted keys, no whitespace) of its fields, all
strings. The fields a caller passes (see `agent.engines.factory.key_fields`) are: the model digest
(the .onnx file AND its external-data files), backend, execution providers, the device / runtime
fingerprint (`agent.engines.fingerprint.key_fingerprint`) and every build option that changes the
engine; `cache_format` is always added.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from agent.engines.fingerprint import CACHE_FORMAT_VERSION
from agent.errors import ModelError

__all__ = ["cache_key", "canonical_json", "file_sha256", "model_digest", "short"]

_CHUNK = 1 << 20


def canonical_json(data: object) -> str:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _external_data_files(model_path: Path) -> list[str]:
    """Relative locations of the external-data files a model refers to (without loading them)."""
    import onnx

    try:
        model = onnx.load(str(model_path), load_external_data=False)
    except Exception as exc:
        raise ModelError(f"cannot read ONNX model {model_path}: {str(exc)[:300]}") from exc
    locations: set[str] = set()

    def visit(tensors: object) -> None:
        for t in tensors:  # type: ignore[attr-defined]
            if t.data_location == onnx.TensorProto.EXTERNAL:
                for entry in t.external_data:
                    if entry.key == "location":
                        locations.add(entry.value)

    graphs = [model.graph]
    while graphs:
        g = graphs.pop()
        visit(g.initializer)
        for node in g.node:
            for attr in node.attribute:
                if attr.HasField("t"):
                    visit([attr.t])
                visit(attr.tensors)
                if attr.HasField("g"):
                    graphs.append(attr.g)
                graphs.extend(attr.graphs)
    return sorted(locations)


def model_digest(model_path: Path) -> str:
    """sha256 over the .onnx file and every external-data file it names (a hash of the .onnx alone
    would not change when only the weights beside it do)."""
    model_path = Path(model_path)
    try:
        main = file_sha256(model_path)
    except OSError as exc:
        raise ModelError(f"cannot read model {model_path}: {exc.strerror or exc}") from exc
    externals = _external_data_files(model_path)
    if not externals:
        return main
    h = hashlib.sha256(main.encode())
    for rel in externals:
        path = (model_path.parent / rel).resolve()
        try:
            digest = file_sha256(path)
        except OSError as exc:
            raise ModelError(f"external data file {rel!r} of {model_path.name} unreadable: "
                             f"{exc.strerror or exc}") from exc
        h.update(f"\0{rel}\0{digest}".encode())
    return h.hexdigest()


def cache_key(fields: dict[str, str]) -> str:
    """sha256 of the canonical JSON of the key fields (cache_format added when missing)."""
    bad = [k for k, v in fields.items() if not isinstance(v, str)]
    if bad:
        raise TypeError(f"cache key fields must be strings: {bad}")
    full = {"cache_format": CACHE_FORMAT_VERSION, **fields}
    return hashlib.sha256(canonical_json(full).encode()).hexdigest()


def short(value: str, n: int = 12) -> str:
    return value[:n]
