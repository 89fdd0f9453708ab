"""`python -m gossipfl ...`: the same as the `gossipfl` command."""

import sys

from .cli import main

sys.exit(main())
