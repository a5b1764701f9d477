"""Accuracy checks of exported bundles against the Hugging Face transformers model (needs `export` extra)."""
