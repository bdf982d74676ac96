"""`python -m repblend.pipeline` is the same as the `repblend` command."""

from repblend.pipeline.cli import entry

entry()
