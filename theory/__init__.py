"""Numerical checks of the paper's theory (§4, App. A) on Gaussian mixtures; see theory/README.md."""
