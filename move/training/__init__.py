"""One training loop for every modality, its optimisers and schedule."""
