"""``python -m moa_train.report``: the same as ``moa-report``."""

from moa_train.report import main

main()
