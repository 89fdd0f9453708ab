#!/usr/bin/env python3
"""Run one gossipfl node on this host: `python node.py --config DEPLOY.toml --id N [--resume]`.

The same as `gossipfl node ...`; kept at the top of the repository for edge hosts that run a
checkout without installing the console script."""

import sys

from gossipfl.cli import main

if __name__ == "__main__":
    sys.exit(main(["node", *sys.argv[1:]]))
