"""Demo task shipped with the repo: data, gold judge and tiny base model (no hub needed)."""
