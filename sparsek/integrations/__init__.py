"""Adapters that let other attention front ends run sparsek (each imports its peer lazily)."""
