"""``python -m hubml.culler`` — see :mod:`hubml.culler.app`."""

import sys

from .app import main

if __name__ == "__main__":
    sys.exit(main())
