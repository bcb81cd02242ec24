"""Model code: the GPT, its attention kinds, value memory, sampling, accounting."""
