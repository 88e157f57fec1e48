"""Implicit Diffusion Models for continuous-scale image super-resolution.

A pure library: it never reads params.yaml, never talks to DVC, MLflow or Prefect.
Everything it needs arrives as arguments.
"""

__version__ = "0.1.0"
