"""Thin HTC-VLM on transformers (not implemented yet: see the issues)."""
