"""Acquiring images: sources, downloads, archives, image files, LR/HR pairs."""
