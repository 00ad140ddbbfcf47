"""A frozen classifier's features as a training signal for the VAE (LPIPS-style feature distance + logit KL)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class FeatureLoss(nn.Module):
    """Distances between a frozen classifier's stage features and logits on real and reconstructed images.

    The classifier takes [0,1] images (a ddcodec teacher); stages are its `net.layer1..layer3` when present.
    """

    def __init__(self, classifier: nn.Module) -> None:
        super().__init__()
        self.classifier = classifier.eval().requires_grad_(False)
        net = getattr(classifier, "net", classifier)
        self.stages = [m for m in (getattr(net, f"layer{i}", None) for i in range(1, 5)) if m is not None]
        self._feats: list[torch.Tensor] = []
        for m in self.stages:
            m.register_forward_hook(lambda _m, _i, out: self._feats.append(out))

    def features(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Stage features and logits of images in [0,1]."""
        self._feats = []
        logits = self.classifier(x)
        feats, self._feats = self._feats, []
        return feats, logits

    def forward(self, real: torch.Tensor, fake: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(feature distance, KL(real logits || fake logits)) for images in [0,1]."""
        with torch.no_grad():
            fr, lr = self.features(real)
        ff, lf = self.features(fake)
        dist = fake.new_zeros(())
        for a, b in zip(fr, ff):
            dist = dist + (_unit(a.float()) - _unit(b.float())).pow(2).sum(1).mean()
        kl = F.kl_div(F.log_softmax(lf.float(), 1), F.log_softmax(lr.float(), 1), log_target=True, reduction="batchmean")
        return dist, kl


def _unit(x: torch.Tensor) -> torch.Tensor:
    """Channel-wise unit normalisation, as LPIPS does before comparing features."""
    return x / (x.pow(2).sum(1, keepdim=True).sqrt() + 1e-8)


def load_feature_net(name: str, device: str | torch.device = "cpu") -> FeatureLoss:
    """FeatureLoss over the named ddcodec teacher (e.g. cifar10-resnet20); it must differ from the evaluating one."""
    from ..labels.teachers import load_teacher
    return FeatureLoss(load_teacher(name, device=device))
