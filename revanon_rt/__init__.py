"""revanon-rt: key-reversible face anonymization with latent diffusion models (revanon v1)."""

__version__ = "0.1.0"
FORMAT = "revanon/1"
