"""Engine cache damage: a real cached engine broken one random way per cycle, then loaded by the agent.

`cache_damage` (100 cycles / 10 quick; `--set cycles=N`): the entry is built by the agent's own CLI
(`edge-agent build-engine MODEL --cache-dir D`, ONNX Runtime CPU EP: the cached engine is the
optimised graph), for the demo model (the victim) and for model_v2 (a second key, the source of
swapped entries). Every cycle restores the pristine entry, damages it one way drawn at random
(byte flips at random offsets, truncation, appended bytes, zero-length engine or metadata, deleted
engine or metadata, unparseable or wrong metadata, the whole entry or only the engine swapped in
from the other key), and loads through `agent.engines.factory.create_engine` with a fresh
`EngineCache`, as a starting agent does. Then:

- hard: the engine that loaded computes the reference outputs (those of the pristine entry, on a
  fixed input), its entry verifies (meta, size, sha256), and an entry taken as a hit is byte for
  byte the pristine one: a corrupt engine loaded is the failure;
- detected: the damage was seen (engine_quarantined) and the entry rebuilt (engine_built);
- recovery: the create_engine call (verify, quarantine, rebuild, load) in seconds, against a hit.

Ends with `edge-agent cache verify` (exit 0) and the quarantine within its bound.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from reliability.common import Context, ScenarioResult, percentile
from tests.support.update_rig import DEMO_MODEL, DEMO_V2, ROOT, sha256_of

GOAL = "0 corrupt engines loaded (hard); every damaged entry detected and rebuilt"
MAX_MB = 4096


def _cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agent.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, check=False)


def _entry_of(cache_dir: Path, model_sha: str) -> Path:
    for meta in cache_dir.glob("*/meta.json"):
        if json.loads(meta.read_text())["fields"]["model_sha256"] == model_sha:
            return meta.parent
    raise RuntimeError(f"no cache entry for model {model_sha[:12]} in {cache_dir}")


# ---- the ways to damage an entry ---------------------------------------------------------------
# Each takes (entry dir, the other key's pristine entry dir, rng) and returns what it did, in words.

Damage = Callable[[Path, Path, random.Random], str]


def _flip(d: Path, other: Path, rng: random.Random) -> str:
    p = d / "engine.bin"
    data = bytearray(p.read_bytes())
    offsets = sorted(rng.sample(range(len(data)), rng.randint(1, 16)))
    for off in offsets:
        data[off] ^= 1 << rng.randrange(8)
    p.write_bytes(bytes(data))
    return f"flipped a bit at {len(offsets)} offsets ({offsets[0]}..{offsets[-1]})"


def _truncate(d: Path, other: Path, rng: random.Random) -> str:
    p = d / "engine.bin"
    size = p.stat().st_size
    keep = rng.randrange(1, size)
    with open(p, "r+b") as f:
        f.truncate(keep)
    return f"engine truncated to {keep} of {size} bytes"


def _append(d: Path, other: Path, rng: random.Random) -> str:
    n = rng.randint(1, 4096)
    with open(d / "engine.bin", "ab") as f:
        f.write(rng.randbytes(n))
    return f"{n} bytes appended to the engine"


def _zero_engine(d: Path, other: Path, rng: random.Random) -> str:
    (d / "engine.bin").write_bytes(b"")
    return "engine zero-length"


def _zero_meta(d: Path, other: Path, rng: random.Random) -> str:
    (d / "meta.json").write_bytes(b"")
    return "metadata zero-length"


def _delete_engine(d: Path, other: Path, rng: random.Random) -> str:
    (d / "engine.bin").unlink()
    return "engine deleted"


def _delete_meta(d: Path, other: Path, rng: random.Random) -> str:
    (d / "meta.json").unlink()
    return "metadata deleted"


def _garbage_meta(d: Path, other: Path, rng: random.Random) -> str:
    p = d / "meta.json"
    data = bytearray(p.read_bytes())
    if rng.random() < 0.5:
        cut = rng.randrange(1, len(data))
        p.write_bytes(bytes(data[:cut]))
        return f"metadata cut at {cut} of {len(data)} bytes"
    for off in rng.sample(range(len(data)), rng.randint(1, 8)):
        data[off] = rng.randrange(256)
    p.write_bytes(bytes(data))
    return "random bytes written into the metadata"


def _wrong_meta(d: Path, other: Path, rng: random.Random) -> str:
    p = d / "meta.json"
    meta = json.loads(p.read_text())
    other_meta = json.loads((other / "meta.json").read_text())
    what = rng.choice(["size", "engine_sha256", "model_sha256", "key", "format", "fields_dropped", "precision"])
    if what == "size":
        meta["size"] = int(meta["size"]) + rng.choice([-1, 1, 4096])
    elif what == "engine_sha256":
        meta["engine_sha256"] = other_meta["engine_sha256"]
    elif what == "model_sha256":
        meta["fields"]["model_sha256"] = other_meta["fields"]["model_sha256"]
    elif what == "key":
        meta["key"] = other_meta["key"]
    elif what == "format":
        meta["format"] = "0"
    elif what == "fields_dropped":
        meta["fields"].pop(rng.choice(sorted(meta["fields"])))
    else:
        meta["fields"]["precision"] = "fp16"
    p.write_text(json.dumps(meta, indent=1))
    return f"metadata valid JSON but wrong: {what}"


def _swap_entry(d: Path, other: Path, rng: random.Random) -> str:
    for name in ("engine.bin", "meta.json"):
        shutil.copyfile(other / name, d / name)
    return "whole entry replaced by the other key's entry"


def _swap_engine(d: Path, other: Path, rng: random.Random) -> str:
    shutil.copyfile(other / "engine.bin", d / "engine.bin")
    return "engine replaced by the other key's engine (same size, own metadata)"


DAMAGES: dict[str, Damage] = {
    "byte_flips": _flip, "truncated": _truncate, "appended": _append, "zero_engine": _zero_engine,
    "zero_meta": _zero_meta, "deleted_engine": _delete_engine, "deleted_meta": _delete_meta,
    "corrupt_meta": _garbage_meta, "wrong_meta": _wrong_meta, "swapped_entry": _swap_entry,
    "swapped_engine": _swap_engine,
}


def _restore(src: Path, dst: Path) -> None:
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst)


def _load(model: Path, cache_dir: Path) -> tuple[Any, list[tuple[str, dict[str, Any]]], float]:
    """create_engine through a fresh EngineCache, as an agent start does: (engine, events, seconds)."""
    from agent.cache.store import EngineCache
    from agent.config import EngineConfig
    from agent.engines.factory import create_engine

    events: list[tuple[str, dict[str, Any]]] = []

    def sink(name: str, data: dict[str, Any]) -> None:
        events.append((name, data))

    t0 = time.monotonic()
    cache = EngineCache(cache_dir, MAX_MB << 20, on_event=sink)
    engine = create_engine(model, EngineConfig(intra_op_threads=1), cache, on_event=sink)
    return engine, events, time.monotonic() - t0


def _max_diff(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    if len(a) != len(b) or any(x.shape != y.shape for x, y in zip(a, b, strict=True)):
        return float("inf")
    return max(float(np.abs(x.astype(np.float64) - y).max()) for x, y in zip(a, b, strict=True))


def cache_damage(ctx: Context) -> ScenarioResult:
    # one "quarantined" warning per cycle would drown the progress lines: the rows carry the reasons
    quiet = logging.getLogger("agent.cache")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        return _cache_damage(ctx)
    finally:
        quiet.setLevel(level)


def _cache_damage(ctx: Context) -> ScenarioResult:
    from agent.cache.store import EngineCache

    n = ctx.cycles(100, 10)
    rng = random.Random(ctx.seed)
    cache_dir = ctx.work / "cache"
    pristine = ctx.work / "pristine"
    for model in (DEMO_MODEL, DEMO_V2):  # the agent's own CLI builds the entries
        built = _cli("build-engine", str(model), "--cache-dir", str(cache_dir))
        if built.returncode != 0:
            raise RuntimeError(f"build-engine {model.name} failed: {built.stderr[-2000:]}")
        ctx.log(built.stdout.strip())
    victim = _entry_of(cache_dir, sha256_of(DEMO_MODEL))
    other = _entry_of(cache_dir, sha256_of(DEMO_V2))
    _restore(victim, pristine / "victim")
    _restore(other, pristine / "other")
    pristine_sha = json.loads((victim / "meta.json").read_text())["engine_sha256"]
    x = np.random.default_rng(ctx.seed).random((1, 3, 320, 320), dtype=np.float32)

    # Reference outputs and the time of a plain hit (what recovery is measured against).
    hits: list[float] = []
    ref: list[np.ndarray] = []
    for _ in range(3):
        engine, events, dt = _load(DEMO_MODEL, cache_dir)
        try:
            if [e for e, _ in events] != ["engine_cache_hit"]:
                raise RuntimeError(f"the pristine entry was not a plain hit: {events}")
            out = [o.copy() for o in engine.infer(x)]
        finally:
            engine.close()
        if ref and _max_diff(out, ref) > 0:
            raise RuntimeError("the pristine entry gives different outputs on two loads")
        ref = out
        hits.append(dt)
    ctx.log(f"pristine hit {percentile(hits, 50):.3f} s; {len(DAMAGES)} kinds of damage, {n} cycles")

    rows: list[dict[str, Any]] = []
    recovery: list[float] = []
    corrupt: list[dict[str, Any]] = []
    undetected: list[dict[str, Any]] = []
    failed: list[dict[str, Any]] = []
    kinds = sorted(DAMAGES)
    for i in range(n):
        # every kind once per round, in random order within the round, so small runs cover them all
        if i % len(kinds) == 0:
            rng.shuffle(kinds)
        kind = kinds[i % len(kinds)]
        _restore(pristine / "victim", victim)
        what = DAMAGES[kind](victim, pristine / "other", rng)
        row: dict[str, Any] = {"cycle": i + 1, "damage": kind, "what": what}
        try:
            engine, events, dt = _load(DEMO_MODEL, cache_dir)
        except Exception as exc:  # the agent could not get an engine at all: not corrupt, but not recovered
            row.update(outcome="load_failed", error=f"{type(exc).__name__}: {str(exc)[:300]}")
            failed.append(row)
            rows.append(row)
            ctx.log(f"cycle {i + 1}/{n}: {kind} ({what}) -> NO ENGINE: {row['error']}")
            continue
        try:
            diff = _max_diff(engine.infer(x), ref)
            key = engine.info.engine_key
        finally:
            engine.close()
        names = [e for e, _ in events]
        quarantined = [d.get("reason") for e, d in events if e == "engine_quarantined"]
        rebuilt = "engine_built" in names
        entry = EngineCache(cache_dir, MAX_MB << 20, check=False)
        info = next((e for e in entry.verify() if e.key == key), None)
        loaded_sha = sha256_of(victim / "engine.bin") if (victim / "engine.bin").is_file() else None
        problems = []
        if diff > 1e-5:
            problems.append(f"outputs differ from the reference by {diff:.3g}")
        if info is None or info.state != "ok":
            problems.append(f"entry after the load is {info.state if info else 'missing'}: "
                            f"{info.reason if info else ''}")
        if not rebuilt and loaded_sha != pristine_sha:
            problems.append("taken as a hit but its bytes are not the pristine engine's")
        row.update(outcome="corrupt_loaded" if problems else ("rebuilt" if rebuilt else "hit"),
                   events=names, quarantine_reason=quarantined[0] if quarantined else None,
                   recovery_s=round(dt, 3), max_diff=diff, problems=problems)
        rows.append(row)
        recovery.append(round(dt, 3))
        if problems:
            corrupt.append(row)
        elif not (quarantined and rebuilt):
            undetected.append(row)
        ctx.log(f"cycle {i + 1}/{n}: {kind} ({what}) -> {row['outcome']}"
                f"{' after quarantine: ' + str(quarantined[0])[:70] if quarantined else ''}; {dt:.2f} s"
                + ("; PROBLEMS " + "; ".join(problems) if problems else ""))

    verify = _cli("cache", "verify", "--cache-dir", str(cache_dir))
    quarantine = sorted(p.name for p in (cache_dir / "quarantine").iterdir())
    leftovers = sorted(str(p.relative_to(cache_dir)) for p in cache_dir.rglob("*") if ".tmp-" in p.name)
    by_kind: dict[str, dict[str, int]] = {}
    for r in rows:
        k = by_kind.setdefault(r["damage"], {})
        k[r["outcome"]] = k.get(r["outcome"], 0) + 1
    notes = [f"hit without damage {percentile(hits, 50):.3f} s; recovery = create_engine with the damaged entry "
             "(verify, quarantine, rebuild, load)"]
    if undetected:
        notes.append(f"{len(undetected)} damaged entries not quarantined+rebuilt: "
                     f"{sorted({r['damage'] for r in undetected})}")
    if failed:
        notes.append(f"{len(failed)} loads failed outright: {sorted({r['damage'] for r in failed})}")
    if verify.returncode != 0:
        notes.append(f"`cache verify` exit {verify.returncode} at the end")
    if leftovers:
        notes.append(f"temp files left: {leftovers[:5]}")
    met = not corrupt and not undetected and not failed and verify.returncode == 0 and not leftovers
    return ScenarioResult(
        name="cache_damage", cycles=n, goal=GOAL, met=met,
        lost=f"{len(corrupt)} corrupt engines loaded; {len(undetected) + len(failed)} of {n} damaged entries "
             "not recovered",
        recovery_s=recovery, hard=True, note="; ".join(notes),
        details={"hit_s": [round(h, 3) for h in hits], "by_kind": by_kind, "cache_verify_rc": verify.returncode,
                 "cache_verify": verify.stdout[-2000:], "quarantine_entries": len(quarantine),
                 "temp_files_left": leftovers, "cycles": rows})


SCENARIOS = {"cache_damage": cache_damage}
