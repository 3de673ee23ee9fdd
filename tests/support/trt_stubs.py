"""tensorrt-stubs, made readable by mypy and `ast`: find the installed stub files, repair their few
syntax errors, write them to a folder that mypy's `mypy_path` names.

Data flow: site-packages/tensorrt/__init__.pyi + tensorrt_bindings/*.pyi (installed with
`pip install --no-deps tensorrt-stubs`) -> `repaired(text)` -> OUT/tensorrt/..., OUT/tensorrt_bindings/...

Why: the stubs package (10.13) ships `tensorrt/__init__.pyi` without a py.typed marker, so mypy
skips it ("missing library stubs or py.typed marker") and, with ignore_missing_imports, every
TensorRT call would silently be Any. Its generated bindings also hold a handful of lines no parser
accepts (a parameter named `in`, a parameter without a default after defaulted ones). Both are
fixed here, on a copy, at CI time: nothing of the stubs is kept in this repository.

    python3 -m tests.support.trt_stubs build/typings     (what .ci/run does before mypy)
"""

from __future__ import annotations

import ast
import importlib.util
import re
import sys
from pathlib import Path

__all__ = ["STUB_FILES", "find_stubs", "repaired", "write_stubs"]

STUB_FILES = ("tensorrt/__init__.pyi", "tensorrt_bindings/__init__.pyi", "tensorrt_bindings/tensorrt.pyi")
_KEYWORD_PARAM = re.compile(r"([(,]\s*)(in|from|lambda|is|not|and|or|if|else|for|def|class|return)(\s*:)")


def find_stubs() -> Path | None:
    """site-packages folder holding the tensorrt-stubs files, or None when they are not installed."""
    spec = importlib.util.find_spec("tensorrt_stubs")
    if spec is None or spec.origin is None:
        return None
    base = Path(spec.origin).parent.parent
    return base if all((base / f).is_file() for f in STUB_FILES) else None


def _split_params(params: str) -> list[str]:
    """Top-level comma split (brackets nest: `dict[str, int]` stays whole)."""
    out, depth, cur = [], 0, ""
    for ch in params:
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        if ch == "," and depth == 0:
            out.append(cur)
            cur = ""
        else:
            cur += ch
    if cur.strip():
        out.append(cur)
    return out


def _fix_def(line: str) -> str:
    line = _KEYWORD_PARAM.sub(lambda m: f"{m.group(1)}{m.group(2)}_{m.group(3)}", line)
    m = re.match(r"^(\s*def \w+\()(.*)(\)\s*->.*:\s*)$", line)
    if m is None:
        return line
    params = _split_params(m.group(2))
    seen_default = False
    fixed = []
    for param in params:
        seen_default = seen_default or "=" in param
        needs_default = seen_default and "=" not in param and not param.strip().startswith(("*", "/"))
        fixed.append(f"{param} = ..." if needs_default else param)
    return m.group(1) + ",".join(fixed) + m.group(3)


def repaired(text: str) -> str:
    """The stub text with every `def` line that does not parse on its own repaired."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        stripped = line.strip()
        if not stripped.startswith("def "):
            continue
        try:
            ast.parse(stripped + " ...")
        except SyntaxError:
            lines[i] = _fix_def(line)
    return "\n".join(lines) + "\n"


def write_stubs(out: Path, source: Path | None = None) -> list[Path]:
    """Write the repaired stubs under `out`; the files written. SystemExit when they are missing."""
    base = source or find_stubs()
    if base is None:
        raise SystemExit("tensorrt-stubs is not installed: python3 -m pip install --no-deps tensorrt-stubs")
    written = []
    for rel in STUB_FILES:
        dst = Path(out) / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        text = repaired((base / rel).read_text(encoding="utf-8"))
        ast.parse(text, filename=str(dst))  # fails loudly when a new stubs release breaks differently
        dst.write_text(text, encoding="utf-8")
        written.append(dst)
    return written


if __name__ == "__main__":
    target = Path(sys.argv[1] if len(sys.argv) > 1 else "build/typings")
    for p in write_stubs(target):
        print(f"wrote {p}")
