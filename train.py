"""`python train.py ...` is `miles train ...` (slime's entry point, kept for muscle memory)."""

import sys

from miles_core.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
