"""Compute primitives shared by every model: linear layers over quantized weights, attention backends."""
