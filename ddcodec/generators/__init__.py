"""Diffusers-backed generators: priors (VAE, denoiser, scheduler, conditioner) and regeneration pipelines."""

from .pipelines import PIPELINES, RegenerationPipeline, build_pipeline, register_pipeline
from .prior import LatentPrior, load_prior, register_builtin, tiny_class_prior

__all__ = ["PIPELINES", "RegenerationPipeline", "build_pipeline", "register_pipeline", "LatentPrior", "load_prior",
           "register_builtin", "tiny_class_prior"]
