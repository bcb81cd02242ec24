"""Text pipeline: corpora, tokenizer, prepared token files, batches, the text task."""
