"""Implicit Diffusion Models for continuous-scale image super-resolution.

A pure library: it never reads params.yaml, never talks to DVC, MLflow or Prefect.
Everything it needs arrives as arguments. The paper's model is in `idm.models` and
`idm.diffusion`; how it is run big or fast, in `idm.inference`.
"""
