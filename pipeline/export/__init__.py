"""Exporters: diffusers folders (and, later, single-file and encoder-only)."""
