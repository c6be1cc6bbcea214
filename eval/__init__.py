"""Evaluation: zero-shot classification, linear probe, image-text retrieval (`python -m eval`)."""
