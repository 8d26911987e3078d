"""Prometheus metrics, lock-free loop metrics and Triton-shaped inference statistics."""
