"""``python -m normzoo``: the same as the ``normzoo`` command."""
import sys

from normzoo.cli import main

if __name__ == "__main__":
    sys.exit(main())
