"""Copy a trained exit-module model keeping only some of its exits (fewer checks per decoded token).

    python scripts/keep_exits.py RUN OUT 9,16,24

RUN: a ``lite train`` output with affine or MLP exit modules (e.g. at every layer 8..29); OUT: a new folder
(refused if it exists) with the modules of the given layers only and no calibration: run ``lite calibrate``
(or ``scripts/ship_default.sh``) on it next (``lite.model.subset.keep_exits``). Which exits to keep:
``benchmarks/ceiling_per_exit.py --set NAME=K,...`` scores any subset on held-out own answers.
"""

from __future__ import annotations

import sys

from lite.errors import LiteError
from lite.model.subset import keep_exits


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print("usage: python scripts/keep_exits.py RUN OUT LAYERS (e.g. 9,16,24)", file=sys.stderr)
        return 2
    try:
        out = keep_exits(argv[0], argv[1], [int(k) for k in argv[2].split(",")])
    except (LiteError, ValueError) as exc:
        print(f"keep_exits: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
