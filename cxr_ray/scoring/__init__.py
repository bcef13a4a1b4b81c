"""Batch scoring with Ray Data: sources -> decode tasks -> predictor actors -> Parquet."""
