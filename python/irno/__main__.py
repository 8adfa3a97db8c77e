"""``python -m irno ...`` is the ``irno`` command line (see irno.cli)."""

import sys

from irno.cli import main

sys.exit(main())
