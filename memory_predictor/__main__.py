"""``python -m memory_predictor evaluate | search | plan`` (see memory_predictor.cli)."""

import sys

from memory_predictor.cli import main

if __name__ == "__main__":
    sys.exit(main())
