"""A heatmap network asked for one landmark at a time (the ``conditioned`` design of the coarse-to-fine local stage).

The network gets the image plus L gated copies of it: channel 1 + l holds the image when landmark l is asked for
and zeros otherwise, so each landmark has its own first-layer filters on top of the shared ones. Constant one-hot
channels would say the same, but a constant's response is removed by the instance normalisation after the first
convolution (it only survives at the padded borders); an image-shaped one survives it. The network outputs the
asked landmark's single map. The alternative, ``shared``, is a plain registry network with one output channel
per landmark.
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
        gated = image * onehot[:, :, None, None, None]  # (B, L, D, H, W): the image in the asked landmark's channel
        output = self.network(torch.cat([image, gated], dim=1))  # (B, 1, D, H, W)
        return output + self.landmark_bias[landmarks].to(output.dtype)[:, None, None, None, None]
