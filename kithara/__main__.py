"""``python -m kithara``: the command line."""

import sys

from kithara.cli import main

sys.exit(main())
