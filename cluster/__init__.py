"""raystill cluster."""
