"""`ray job submit` entrypoints: retrain, nightly_score, screen_archive."""
