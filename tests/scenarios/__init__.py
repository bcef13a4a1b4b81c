"""Fault scenarios run in their own processes (they start and kill their own Ray clusters)."""
