"""A heatmap network asked for one landmark at a time (the ``conditioned`` design of the coarse-to-fine local stage).

The image gets L constant one-hot channels saying which landmark to find (channel 1 + l is 1 everywhere for
landmark l, the others 0) and the network outputs that landmark's single map. The alternative, ``shared``, is a
plain registry network with one output channel per landmark.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["LandmarkConditioned"]


class LandmarkConditioned(nn.Module):
    """One landmark's map from an image and the index of the landmark asked for.

    Args:
        network: a heatmap network built with ``1 + num_landmarks`` input channels and 1 output channel.
        num_landmarks: L.
    """

    def __init__(self, network: nn.Module, num_landmarks: int) -> None:
        super().__init__()
        self.network, self.num_landmarks = network, num_landmarks
        # per-landmark output offset, as the shared design's per-channel output bias: for spatial_ce it is exactly a
        # per-landmark absent logit (the softmax over the voxels ignores a constant), for the others a presence offset
        self.landmark_bias = nn.Parameter(torch.zeros(num_landmarks))

    def forward(self, image: torch.Tensor, landmarks: torch.Tensor) -> torch.Tensor:
        """(B, 1, D, H, W) image, (B,) long landmark indices -> (B, 1, D, H, W) the asked landmark's map."""
        onehot = F.one_hot(landmarks, self.num_landmarks).to(image.dtype)  # (B, L)
        channels = onehot[:, :, None, None, None].expand(-1, -1, *image.shape[2:])  # (B, L, D, H, W)
        output = self.network(torch.cat([image, channels], dim=1))  # (B, 1, D, H, W)
        return output + self.landmark_bias[landmarks].to(output.dtype)[:, None, None, None, None]
