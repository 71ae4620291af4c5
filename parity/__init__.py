"""Parity tools: tolerances, strategies and comparisons that porters can use."""
