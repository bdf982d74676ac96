"""repblend.stages."""
