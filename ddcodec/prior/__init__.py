"""Training and evaluating ddcodec's own latent diffusion priors (`ddcodec prior train | eval`)."""

from .config import PriorConfig, build_prior
from .train import train_prior

__all__ = ["PriorConfig", "build_prior", "train_prior"]
