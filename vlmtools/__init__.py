"""vlmtools: composable commands for explainable fine-grained classification with CLIP-style models."""

__version__ = "0.1.0"
