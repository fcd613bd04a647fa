"""``python -m moa_train.bench``: the same as ``moa-bench``."""

import sys

from moa_train.bench.runner import main

if __name__ == "__main__":
    sys.exit(main())
