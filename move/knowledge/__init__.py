"""The knowledge-capacity probe: a synthetic corpus of facts and a recall evaluation."""
