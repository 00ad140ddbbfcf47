"""Conditioners: map class ids and prompts to the denoiser's conditioning tensors."""

from __future__ import annotations

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn


class ClassEmbedder(ModelMixin, ConfigMixin):
    """A learned table of per-class context tokens for cross-attention (LDM-cin256 style).

    Row `num_classes` is the null class used for classifier-free guidance.
    """

    @register_to_config
    def __init__(self, num_classes: int = 10, num_tokens: int = 1, embed_dim: int = 32) -> None:
        super().__init__()
        self.embedding = nn.Embedding(num_classes + 1, num_tokens * embed_dim)

    def forward(self, class_ids: torch.Tensor) -> torch.Tensor:
        """Context tokens (B, num_tokens, embed_dim) for `class_ids`; -1 selects the null class."""
        c = self.config
        idx = torch.where(class_ids < 0, torch.full_like(class_ids, c.num_classes), class_ids)
        return self.embedding(idx).view(-1, c.num_tokens, c.embed_dim)

    def condition(self, class_ids: torch.Tensor, prompts: list[str]) -> dict[str, torch.Tensor]:
        """Denoiser keyword arguments for these classes."""
        return {"encoder_hidden_states": self(class_ids)}

    def null_condition(self, n: int, negative_prompt: str | None = None) -> dict[str, torch.Tensor]:
        """Unconditional keyword arguments for classifier-free guidance."""
        return self.condition(torch.full((n,), -1, dtype=torch.long, device=self.device), [""] * n)
