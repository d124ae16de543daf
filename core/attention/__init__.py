"""Attention: the interface every backend implements, and the reference backend."""
