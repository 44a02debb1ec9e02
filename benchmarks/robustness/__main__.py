"""``python -m omnienc.benchmarks.robustness``: the whole harness (see :mod:`.harness`)."""

import sys

from omnienc.benchmarks.robustness.harness import main

sys.exit(main())
