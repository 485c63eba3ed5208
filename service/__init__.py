"""raystill service."""
