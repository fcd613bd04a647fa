"""Refuse to start `make setup` on a disk too full to hold the virtual environment.

Usage: python3 scripts/check_disk.py GIB [PATH]  (exit 1 with one line when PATH's disk has < GIB free)

Without it a full disk shows up minutes later as pip's `OSError: [Errno 28] No space left on device`
halfway through installing torch, leaving a half-built `.venv`. Standard library only: it runs before the
virtual environment exists.
"""

from __future__ import annotations

import shutil
import sys


def main(argv: list[str]) -> int:
    if len(argv) not in (1, 2):
        print("usage: check_disk.py GIB [PATH]", file=sys.stderr)
        return 2
    try:
        need = float(argv[0])
    except ValueError:
        print(f"check_disk.py: GIB={argv[0]!r} is not a number; pass e.g. SETUP_GIB=3", file=sys.stderr)
        return 2
    path = argv[1] if len(argv) == 2 else "."
    free = shutil.disk_usage(path).free / 2**30
    if free < need:
        print(
            f"error: {free:.1f} GiB free on the disk of {path}; `make setup` needs about {need:g} GiB for .venv: "
            "free some space (old clones, runs/, ~/.cache/pip) and run it again",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
