#!/usr/bin/env python
"""Benchmark the flax and torch backends side by side on this machine (see bench/__init__.py).

python scripts/bench.py --out DIR [--stages prior,decoder] [--sizes tiny,small]
"""

import sys
from pathlib import Path

# bench/ is a top-level folder of the repository, not part of the installed package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.run import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
