"""``python -m approx_jax``: the ``approx-jax`` command line."""

import sys

from approx_jax._src.cli import main

if __name__ == "__main__":
    sys.exit(main())
