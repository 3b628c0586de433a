"""`python -m wanpack` runs the CLI."""

import sys

from wanpack.cli import main

sys.exit(main())
