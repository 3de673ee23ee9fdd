"""Counting accuracy on generated conveyor clips with known crossings (issue 15's counting goal).

    python scripts/measure_counting.py                       # the standard set, results under docs/measurements/
    python scripts/measure_counting.py --seeds 1 --variants standard --out /tmp/counting   # a quick look

For each lighting variant, seed and clip of `scenes.COUNTING_CLIPS` (steady flow, touching plates,
reversals, a plate stopping on the line) it writes an MJPG clip and its truth (scripts/scenes.py),
runs the REAL service on it (OpenCV decoding, the bundled demo model on ONNX Runtime, ByteTrack from
`trackers`, agent/plc/counting.py) and compares the line's in / out counters with the truth. Per clip:
exact or not; over the set: accuracy = 1 - (sum of |counted - true| over in and out) / (true crossings).
Goal: >= 99 %. For comparison, the same tracks also go through supervision's LineZone (same anchor,
same minimum frames), which has no dead band along the line.

Writes OUT/results.json and OUT/README.md (command, date, machine, commit, versions, table).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import platform
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import scenes  # noqa: E402

from agent.config import parse_config  # noqa: E402
from agent.service import Service  # noqa: E402

LINE_X = 320
MIN_FRAMES = 2


class SupervisionLine:
    """supervision's LineZone fed with the agent's own tracks, for the comparison column."""

    def __init__(self) -> None:
        import numpy as np
        import supervision as sv

        self.sv, self.np = sv, np
        self.zone = sv.LineZone(start=sv.Point(LINE_X, 0), end=sv.Point(LINE_X, 360),
                                triggering_anchors=[sv.Position.CENTER], minimum_crossing_threshold=MIN_FRAMES)
        probe = sv.LineZone(start=sv.Point(LINE_X, 0), end=sv.Point(LINE_X, 360),
                            triggering_anchors=[sv.Position.CENTER], minimum_crossing_threshold=1)
        for x in (LINE_X - 40, LINE_X + 40, LINE_X + 40):
            probe.trigger(self._dets([(x - 30, 150, x + 30, 200)], [1], [0]))
        self.swap = probe.out_count > 0  # which of its counts is our left_to_right `in`

    def _dets(self, boxes: list[Any], ids: list[int], classes: list[int]) -> Any:
        np = self.np
        return self.sv.Detections(xyxy=np.asarray(boxes, float).reshape(-1, 4), class_id=np.asarray(classes, int),
                                  tracker_id=np.asarray(ids, int))

    def feed(self, boxes: list[Any], ids: list[int]) -> None:
        self.zone.trigger(self._dets(boxes, ids, [0] * len(ids)))

    def counts(self) -> tuple[int, int]:
        a, b = self.zone.in_count, self.zone.out_count
        return (b, a) if self.swap else (a, b)


def run_clip(path: Path, state: Path) -> dict[str, Any]:
    cfg = parse_config({
        "device_id": "measure",
        "cameras": [{"id": "cam0", "source": str(path), "pace": False,
                     "counting": {"anchor": "center", "min_frames": MIN_FRAMES, "state_file": str(state),
                                  "lines": [{"name": "l1", "points": [[LINE_X, 0], [LINE_X, 360]],
                                             "direction": "left_to_right", "labels": ["part"]}]}}],
        "engine": {"warmup_runs": 1}, "mqtt": {"enabled": False}, "updates": {"enabled": False},
        "service": {"watchdog": False},
    })
    svc = Service(cfg, use_cache=False)
    ref = SupervisionLine()
    t0 = time.perf_counter()
    svc.start()
    comp: Any = svc.plc[0]

    def compare(result: Any) -> None:
        pairs = [(d.box, t) for d, t in zip(result.detections, comp.last_ids, strict=True)
                 if t is not None and d.label == "part"]
        ref.feed([b for b, _ in pairs], [t for _, t in pairs])

    svc.add_result_listener("cam0", compare)
    try:
        for p in svc.pipelines:
            p.finished.wait(600)
    finally:
        svc.shutdown()
    got = comp.counters()
    return {"in": got["line/l1/in"], "out": got["line/l1/out"], "frames": comp.n["frames"],
            "supervision": dict(zip(("in", "out"), ref.counts(), strict=True)),
            "seconds": round(time.perf_counter() - t0, 2)}


def _git(*args: str) -> str:
    try:
        done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10, check=False)
        return done.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "?"


def _machine() -> str:
    cpu = platform.processor() or "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{platform.node()} ({platform.machine()}, {cpu}, {os.cpu_count()} cores), "
            f"Python {platform.python_version()}")


def _versions() -> dict[str, str]:
    out = {}
    for pkg in ("trackers", "supervision", "onnxruntime", "opencv-python-headless", "numpy"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "-"
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=3, help="seeds per clip and variant (1..N)")
    ap.add_argument("--variants", default="standard,dim,bright", help="lighting variants, comma separated")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "measurements" / "counting-2026-12-01")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    variants = [v for v in args.variants.split(",") if v]
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="counting-") as tmp:
        for variant in variants:
            for seed in range(1, args.seeds + 1):
                for base in scenes.COUNTING_CLIPS:
                    clip = dataclasses.replace(base, variant=variant)
                    path = Path(tmp) / f"{clip.name}-{variant}-{seed}.avi"
                    truth = scenes.write_counting_clip(path, clip, seed)["crossings"]
                    got = run_clip(path, Path(tmp) / f"state-{path.stem}.json")
                    err = abs(got["in"] - truth["in"]) + abs(got["out"] - truth["out"])
                    sv = got["supervision"]
                    row = {"clip": clip.name, "variant": variant, "seed": seed, "frames": got["frames"],
                           "true": truth, "counted": {"in": got["in"], "out": got["out"]}, "errors": err,
                           "exact": err == 0, "supervision_linezone": sv,
                           "supervision_errors": abs(sv["in"] - truth["in"]) + abs(sv["out"] - truth["out"]),
                           "seconds": got["seconds"]}
                    rows.append(row)
                    print(f"{clip.name:13s} {variant:8s} seed {seed}: true in {truth['in']} out {truth['out']}, "
                          f"counted in {got['in']} out {got['out']} ({'exact' if err == 0 else f'{err} off'}); "
                          f"LineZone in {sv['in']} out {sv['out']}", flush=True)
    true_total = sum(r["true"]["in"] + r["true"]["out"] for r in rows)
    errors = sum(r["errors"] for r in rows)
    sv_errors = sum(r["supervision_errors"] for r in rows)
    summary = {"clips": len(rows), "exact": sum(r["exact"] for r in rows), "true_crossings": true_total,
               "errors": errors, "accuracy": round(1 - errors / true_total, 4) if true_total else None,
               "supervision_linezone_accuracy": round(1 - sv_errors / true_total, 4) if true_total else None,
               "goal": 0.99}
    dirty = " (with uncommitted changes)" if _git("status", "--porcelain") else ""
    command = "python3 scripts/measure_counting.py " + " ".join(argv if argv is not None else sys.argv[1:])
    meta: dict[str, Any] = {
        "command": command, "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "machine": _machine(),
        "commit": _git("rev-parse", "HEAD") + dirty, "versions": _versions(),
        "settings": {"anchor": "center", "min_frames": MIN_FRAMES, "band_px": 2.0, "line_x": LINE_X,
                     "labels": ["part"], "model": "agent/data/demo/model.onnx (ONNX Runtime, CPU)"}}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps({**meta, "summary": summary, "clips": rows}, indent=1) + "\n")
    lines = [f"# Counting accuracy, {meta['date'][:10]}", "",
             f"- command: `{meta['command'].strip()}`", f"- date: {meta['date']}", f"- machine: {meta['machine']}",
             f"- commit: {meta['commit']}", "- versions: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()),
             f"- settings: {json.dumps(meta['settings'])}", "",
             f"**{summary['exact']} / {summary['clips']} clips exact; accuracy {summary['accuracy']:.2%} over "
             f"{true_total} true crossings (goal >= 99 %)**; supervision's LineZone on the same tracks: "
             f"{summary['supervision_linezone_accuracy']:.2%}.", "",
             "| clip | lighting | seed | frames | true in / out | counted in / out | exact | LineZone in / out |",
             "| --- | --- | ---: | ---: | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['clip']} | {r['variant']} | {r['seed']} | {r['frames']} | {r['true']['in']} / "
                     f"{r['true']['out']} | {r['counted']['in']} / {r['counted']['out']} | "
                     f"{'yes' if r['exact'] else 'NO'} | {r['supervision_linezone']['in']} / "
                     f"{r['supervision_linezone']['out']} |")
    (args.out / "README.md").write_text("\n".join(lines) + "\n")
    print(json.dumps(summary))
    return 0 if summary["accuracy"] is not None and summary["accuracy"] >= 0.99 else 1


if __name__ == "__main__":
    raise SystemExit(main())
