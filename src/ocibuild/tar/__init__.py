"""Tar: reproducible layer writing (write), the one tar parser (read), extraction (extract), compression (codecs)."""
