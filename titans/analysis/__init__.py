"""Inspection tools: what the neural memory records while reading a text, and where time goes."""
