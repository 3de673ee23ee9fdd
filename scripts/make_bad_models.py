"""Write the bad-model corpus (see scripts/bad_models.py) into a directory.

    python scripts/make_bad_models.py OUT_DIR [--source MODEL_TO_TRUNCATE]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bad_models import make_bad_models


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--source", type=Path, help="model whose bytes 'truncated' cuts (default: bundled demo)")
    args = ap.parse_args(argv)
    for kind, path in make_bad_models(args.out_dir, args.source).items():
        print(f"{kind:20s} {path} ({path.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
