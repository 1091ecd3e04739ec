"""`python -m escort_jax`: the same as the `escort-jax` console script."""

import sys

from escort_jax.cli import main

if __name__ == "__main__":
  sys.exit(main())
