"""raystill datasets_pipeline."""
