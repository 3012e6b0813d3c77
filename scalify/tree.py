"""ScaledArray-aware tree utilities."""
