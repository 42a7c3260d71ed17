"""``python -m tools.study``."""

import sys

from tools.study.cli import main

sys.exit(main())
