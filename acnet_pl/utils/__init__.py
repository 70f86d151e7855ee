"""Leaf helpers that import nothing from acnet_pl: file writes and loading, config conversion, FLOPs."""
