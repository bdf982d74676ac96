"""repblend.pipeline."""
