"""Loaders of release checkpoint layouts (no original repository needed); each names what is missing or mismatched."""
