#!/usr/bin/env python3
"""Export a YOLOv8n-sized detector to ONNX with random weights, for timing only.

Uses Ultralytics (the optional `bench` extra, never a runtime dependency) to build the network from
the architecture file inside its package, so nothing is downloaded and no trained weights exist:
the boxes it finds are meaningless, its speed is YOLOv8n's.

    YOLO_OFFLINE=true python scripts/export_yolov8n.py OUT.onnx [--imgsz 640] [--arch yolov8n.yaml]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("--imgsz", type=int, default=640)
    ap.add_argument("--arch", default="yolov8n.yaml", help="an Ultralytics architecture file (yolo11n.yaml, ...)")
    args = ap.parse_args()
    out = args.out.resolve()  # before leaving the caller's directory
    os.environ.setdefault("YOLO_OFFLINE", "true")
    os.environ.setdefault("YOLO_AUTOINSTALL", "false")
    try:
        from ultralytics import YOLO
    except ImportError:
        print("export_yolov8n: needs ultralytics (pip install 'edge-agent[bench]')", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        os.chdir(tmp)
        model = YOLO(args.arch)  # architecture only: random initial weights
        exported = Path(model.export(format="onnx", imgsz=args.imgsz, opset=17, simplify=False, dynamic=False))
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(exported, out)
    print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
