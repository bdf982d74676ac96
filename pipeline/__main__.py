"""`python -m repblend.pipeline` is the same as the `repblend` command."""

import sys

from repblend.pipeline.cli import main

sys.exit(main())
