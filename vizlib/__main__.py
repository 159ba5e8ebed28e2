"""``python -m vizlib``: the command-line face of HybridLens (see ``vizlib.cli``)."""

import sys

from vizlib.cli import main

sys.exit(main())
