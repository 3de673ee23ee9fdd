"""Child process for the cache's multi-process tests: get_or_build with a slow, counted build.

usage: python _worker.py ROOT MARKER START_AT CHUNKS CHUNK_SLEEP_S
Prints one JSON line {"built": bool, "ok": bool} when it finishes.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from agent.cache.store import EngineCache

FIELDS = {"model_sha256": "m" * 64, "backend": "test", "providers": ""}
CHUNK = b"0123456789abcdef" * 256  # 4 KiB


def expected(chunks: int) -> bytes:
    return CHUNK * chunks


def main() -> None:
    root, marker, start_at, chunks, sleep_s = (Path(sys.argv[1]), Path(sys.argv[2]), float(sys.argv[3]),
                                                int(sys.argv[4]), float(sys.argv[5]))
    cache = EngineCache(root, 1 << 30, fingerprint=lambda backend, providers: {})

    def build(path: Path) -> None:
        with open(marker, "a", encoding="ascii") as fh:
            fh.write(f"{os.getpid()}\n")
            fh.flush()
            os.fsync(fh.fileno())
        with open(path, "wb") as fh:
            for _ in range(chunks):
                fh.write(CHUNK)
                fh.flush()
                time.sleep(sleep_s)

    def load(path: Path) -> bytes:
        data = path.read_bytes()
        if data != expected(chunks):
            raise ValueError("engine content differs")
        return data

    delay = start_at - time.time()
    if delay > 0:
        time.sleep(delay)
    data, entry = cache.get_or_build(FIELDS, build, load)
    print(json.dumps({"built": entry.built, "ok": data == expected(chunks)}), flush=True)


if __name__ == "__main__":
    main()
