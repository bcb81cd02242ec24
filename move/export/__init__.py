"""Exports of trained models to other ecosystems."""
