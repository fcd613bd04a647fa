#!/usr/bin/env python
"""Thin wrapper around ``moa-bench`` (``moa_train.bench:main``), for running from a source checkout:

    python scripts/bench.py --quick          # same as: moa-bench --quick

See docs/benchmarks.md for what it measures and the published numbers.
"""

from __future__ import annotations

import sys
from pathlib import Path

try:
    from moa_train.bench import main
except ImportError:  # not installed: use the checkout's src/
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from moa_train.bench import main

if __name__ == "__main__":
    sys.exit(main())
