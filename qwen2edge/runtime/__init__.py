"""Torch-free generation runtime: sampling, tokenization and backends that run exported bundles."""
