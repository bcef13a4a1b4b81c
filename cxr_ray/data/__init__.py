"""Ingestion: list sources, read bytes, decode, manifests and patient-grouped splits."""
