#!/usr/bin/env python3
"""Plot the per-frame latency distributions of an `edge-agent bench --json` run to a PNG.

    python scripts/plot_latency.py bench.json [-o latency.png] [--paths bare_iobinding,pipeline_paced]

Left: the cumulative distribution of every path's per-frame latency (log x); right: its p50 / p99
as bars, so a tail shows even when the medians agree. Needs matplotlib (the `bench` extra).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

ORDER = ["bare", "bare_iobinding", "pipeline_memory", "pipeline_memory_pinned", "pipeline_memory_cpu_pre",
         "pipeline_paced", "pipeline_file", "ultralytics"]


def series(result: dict[str, Any], paths: list[str] | None) -> dict[str, np.ndarray]:
    out = {}
    for key in paths or ORDER:
        row = result.get(key)
        if isinstance(row, dict) and row.get("latencies_ms"):
            out[key] = np.sort(np.asarray(row["latencies_ms"], dtype=np.float64))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bench_json", type=Path)
    ap.add_argument("-o", "--out", type=Path, default=None, help="PNG path (default: beside the JSON)")
    ap.add_argument("--paths", default="", help="comma-separated rows to plot (default: all with latencies)")
    args = ap.parse_args()
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("plot_latency: needs matplotlib (pip install 'edge-agent[bench]')", file=sys.stderr)
        return 2
    result = json.loads(args.bench_json.read_text())
    data = series(result, [p for p in args.paths.split(",") if p] or None)
    if not data:
        print(f"plot_latency: no per-frame latencies in {args.bench_json} (bench JSON from this version?)",
              file=sys.stderr)
        return 1
    fig, (cdf, bars) = plt.subplots(1, 2, figsize=(13, 5), gridspec_kw={"width_ratios": [3, 2]})
    for name, ms in data.items():
        cdf.plot(ms, np.arange(1, ms.size + 1) / ms.size, label=f"{name} ({result[name]['fps']:.0f} fps)")
    cdf.set_xscale("log")
    cdf.set_xlabel("latency per frame, ms (log)")
    cdf.set_ylabel("share of frames")
    cdf.grid(True, which="both", alpha=0.3)
    cdf.legend(fontsize=8)
    names = list(data)
    x = np.arange(len(names))
    p50 = [float(np.percentile(data[n], 50)) for n in names]
    p99 = [float(np.percentile(data[n], 99)) for n in names]
    bars.bar(x - 0.2, p50, 0.4, label="p50")
    bars.bar(x + 0.2, p99, 0.4, label="p99")
    bars.set_xticks(x, names, rotation=35, ha="right", fontsize=8)
    bars.set_ylabel("ms")
    bars.legend()
    model = Path(str(result.get("model", "?"))).name
    fig.suptitle(f"{model} on {result.get('providers', ['?'])[0]}, frames "
                 f"{'x'.join(str(v) for v in result.get('frame_size', []))}, cuda_graph {result.get('cuda_graph')}")
    fig.tight_layout()
    out = args.out or args.bench_json.with_suffix(".png")
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
