"""Serving low-bit ipex-llm models with Ray Serve."""
