"""raystill rayjobs."""
