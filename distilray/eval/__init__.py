"""Evaluation metrics (pure torch/numpy)."""
