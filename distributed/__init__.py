"""repblend.distributed."""
