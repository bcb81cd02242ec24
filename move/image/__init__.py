"""Class-conditional images: datasets, tokenizers, prepared token grids, tasks, guided sampling, evaluation."""
