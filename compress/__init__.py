"""compress: offline compression of causal language models, with a small int4 runtime."""

__version__ = "0.1.0"
