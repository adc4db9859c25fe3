"""``python -m benchmarks.loadgen {run,sweep} --help``."""

import sys

from benchmarks.loadgen.cli import main

sys.exit(main())
