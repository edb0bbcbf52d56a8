"""Training letterpress's own small model and its tokenizer."""
