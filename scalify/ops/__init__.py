"""User-facing ops: casts, dynamic rescaling, debug."""
