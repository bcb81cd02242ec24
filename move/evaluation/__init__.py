"""Metrics: bits per byte for text."""
