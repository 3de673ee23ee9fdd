"""Generate synthetic conveyor-belt stills (YOLO labels) and/or videos (ground truth JSON).

    python scripts/make_scenes.py images OUT_DIR --count 200 --seed 11
    python scripts/make_scenes.py video OUT.mp4 --seed 1001 --seconds 6 --fps 15
    python scripts/make_scenes.py video unseen.mp4 --seed 2002 --lighting unseen

Deterministic by seed. Videos are mp4v (.mp4) or MJPG (.avi); the truth JSON sits beside the video
with the same stem: {"labels", "width", "height", "fps", "frames": [{"index", "objects": [...]}]}.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import scenes


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="kind", required=True)
    for name in ("images", "video"):
        p = sub.add_parser(name)
        p.add_argument("out", type=Path)
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--lighting", choices=scenes.VARIANTS, default="standard",
                       help="style variant; 'unseen' lies outside the training distribution")
        p.add_argument("--width", type=int, default=640)
        p.add_argument("--height", type=int, default=360)
        if name == "images":
            p.add_argument("--count", type=int, default=100)
        else:
            p.add_argument("--seconds", type=float, default=6.0)
            p.add_argument("--fps", type=int, default=15)
            p.add_argument("--motion", choices=("indexed", "continuous"), default="indexed")
    args = ap.parse_args(argv)
    if args.kind == "images":
        paths = scenes.write_images(args.out, args.count, args.seed, args.width, args.height, args.lighting)
        print(f"wrote {len(paths)} images + labels under {args.out}")
    else:
        truth = scenes.write_video(args.out, args.seed, args.seconds, args.fps, args.width, args.height,
                                   args.lighting, args.motion)
        n = sum(len(f["objects"]) for f in truth["frames"])
        print(f"wrote {args.out} ({len(truth['frames'])} frames, {n} objects) and {args.out.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
