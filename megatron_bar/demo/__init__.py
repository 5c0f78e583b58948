"""The tiny default: a model, tokenizer and data small enough for CPU, built offline."""
