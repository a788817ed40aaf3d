"""Datasets, samplers, transforms and downloads (one module per concept)."""
