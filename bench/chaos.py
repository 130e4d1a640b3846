"""Chaos benchmarks: random SIGKILLs under load, and the recovery of a killed notifier's
callbacks. The scenarios live in harness/chaos.py (tests/test_chaos.py runs the first, smaller);
this is their command line:

    .venv/bin/python bench/chaos.py [--jobs 1000] [--aggregations 20] [--min-kills 20] [--seed 1]
    .venv/bin/python bench/chaos.py --notifier-recovery [--callbacks 10]
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from harness.chaos import main

if __name__ == "__main__":
    sys.exit(main())
