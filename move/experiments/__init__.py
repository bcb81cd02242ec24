"""Experiments: the main comparison job and its report."""
