"""Class labels: from the config (a list or a file) or from the model's metadata.

Model metadata is untrusted input (models arrive over the network): it is parsed with
`ast.literal_eval` or `json.loads` only, never `eval`, and its size is bounded.
"""

from __future__ import annotations

import ast
import json
import logging
from pathlib import Path
from typing import Any

from agent.errors import ModelError

__all__ = ["fallback_labels", "labels_from_metadata", "load_labels"]

log = logging.getLogger(__name__)

_META_KEYS = ("names", "labels", "classes")
_MAX_META_CHARS = 1_000_000
_MAX_CLASSES = 100_000


def fallback_labels(num_classes: int) -> list[str]:
    return [f"class_{i}" for i in range(num_classes)]


def _parse(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        pass
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return None


def _names(value: Any) -> list[str] | None:
    if isinstance(value, (list, tuple)):
        if value and all(isinstance(v, str) for v in value):
            return [str(v) for v in value]
        return None
    if isinstance(value, dict) and value:
        try:
            by_id = {int(k): v for k, v in value.items()}
        except (TypeError, ValueError):
            return None
        if not all(isinstance(v, str) for v in by_id.values()):
            return None
        if min(by_id) < 0 or max(by_id) >= _MAX_CLASSES:
            return None
        # gaps (a model trained on a subset of ids) get generic names
        return [by_id.get(i, f"class_{i}") for i in range(max(by_id) + 1)]
    return None


def labels_from_metadata(meta: dict[str, str]) -> list[str] | None:
    """Labels from model metadata: Ultralytics `names` ("{0: 'person', 1: 'car'}") or a JSON list/object."""
    for key in _META_KEYS:
        text = meta.get(key)
        if not isinstance(text, str) or not text.strip():
            continue
        if len(text) > _MAX_META_CHARS:
            log.warning("model metadata %r is %d characters long; ignored", key, len(text))
            continue
        names = _names(_parse(text.strip()))
        if names is not None:
            return names
        log.warning("model metadata %r is not a list or dict of names; ignored: %.80r", key, text)
    return None


def _check_count(labels: list[str], num_classes: int | None, source: str) -> list[str]:
    if num_classes is not None and len(labels) != num_classes:
        raise ModelError(f"{source} gives {len(labels)} labels but the model outputs {num_classes} classes")
    if len(set(labels)) != len(labels):
        log.warning("%s has duplicate labels; class_thresholds apply to every class of that name", source)
    return labels


def load_labels(spec: list[str] | Path | None, model_meta: dict[str, str],
                num_classes: int | None) -> list[str]:
    """Resolve the labels: explicit list or file (count must match), else metadata, else class_<i>.

    With no usable source and an unknown class count (end2end outputs) the result is empty and the
    postprocessor names classes `class_<id>` as they appear.
    """
    if isinstance(spec, list):
        return _check_count([str(s) for s in spec], num_classes, "model.labels")
    if isinstance(spec, (str, Path)):
        path = Path(spec)
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ModelError(f"cannot read labels file {path}: {exc}") from exc
        labels = [line.strip() for line in text.splitlines() if line.strip()]
        if not labels:
            raise ModelError(f"labels file {path} has no labels")
        return _check_count(labels, num_classes, f"labels file {path}")
    names = labels_from_metadata(model_meta)
    if names is not None:
        if num_classes is None or len(names) == num_classes:
            return names
        log.warning("model metadata lists %d names but the model outputs %d classes; using class_<i> names",
                    len(names), num_classes)
        return fallback_labels(num_classes)
    if num_classes is None:
        log.warning("no labels configured or found in the model metadata, and the class count is unknown; "
                    "classes will be named class_<id>")
        return []
    log.warning("no labels configured or found in the model metadata; using class_0..class_%d",
                num_classes - 1)
    return fallback_labels(num_classes)
