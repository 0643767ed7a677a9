import sys

from keye_jax.cli import main

sys.exit(main())
