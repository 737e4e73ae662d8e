"""Measurement on real models: Q/K/V capture, error metrics, perplexity."""
