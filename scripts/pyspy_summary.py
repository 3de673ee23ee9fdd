"""Summarise a py-spy raw profile (`py-spy record --threads --format raw`) of the agent by thread kind.

Usage: python3 scripts/pyspy_summary.py PROFILE.txt [--top 12]

py-spy counts a thread only while it is not idle (not blocked in a lock or a system call wait), so
samples per thread kind are a share of host CPU. Per kind it prints the share, then the places
that cost most: the innermost frame of the agent's own code with what it called there, so a cost
inside a library (ONNX Runtime, PyNvVideoCodec, numpy, threading) is charged to the agent line that
made the call. Thread kinds are the bench's groups (agent.telemetry.threads: capture-s3 -> capture).
"""

from __future__ import annotations

import argparse
import collections
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a file from the project's root too
from agent.telemetry.threads import OTHER, group_of

_THREAD = re.compile(r"^thread \((?:0x)?[0-9a-fA-F]+\):\s*(.*)$")


def kind_of(name: str) -> str:
    """The thread's group as the bench's per-thread CPU split names it (agent.telemetry.threads);
    a name no group claims stays itself."""
    name = name.strip()
    if not name:
        return "unnamed"
    group = group_of(name)
    return name if group == OTHER else group


def charge(frames: list[str]) -> str:
    """The innermost agent frame and its callee: where the agent spent (or caused) this sample."""
    inner = None
    for i, f in enumerate(frames):
        if "agent/" in f or "scripts/" in f:
            inner = i
    if inner is None:
        return frames[-1] if frames else "?"
    here = frames[inner]
    callee = frames[inner + 1] if inner + 1 < len(frames) else "(own code)"
    callee = re.sub(r" \(.*\)$", "", callee)
    return f"{here} -> {callee}"


def summarise(text: str, top: int) -> str:
    by_kind: collections.Counter[str] = collections.Counter()
    places: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    total = 0
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        parts = stack.split(";")
        m = _THREAD.match(parts[0])
        kind = kind_of(m.group(1)) if m else "?"
        frames = parts[1:] if m else parts
        if frames and not re.search(r"\(", frames[0]):  # the thread's name repeated as a frame
            frames = frames[1:]
        by_kind[kind] += n
        places[kind][charge(frames)] += n
        total += n
    out = [f"{total} samples in all"]
    for kind, n in by_kind.most_common():
        out.append(f"\n{kind}: {n} samples, {100 * n / max(total, 1):.1f} %")
        for place, c in places[kind].most_common(top):
            out.append(f"  {100 * c / max(n, 1):5.1f} %  {place}")
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("profile", type=Path)
    ap.add_argument("--top", type=int, default=12)
    args = ap.parse_args()
    print(summarise(args.profile.read_text(errors="replace"), args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
