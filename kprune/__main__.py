"""`python -m kprune`: the same as the `kprune` command."""

import sys

from kprune.tools.cli import main

if __name__ == "__main__":
    sys.exit(main())
