"""Quantization: the shared integer math (int4) and one module per algorithm."""
