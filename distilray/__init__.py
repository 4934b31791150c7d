"""distilray: make language models faster and leaner, on Ray."""

__version__ = "0.1.0"
