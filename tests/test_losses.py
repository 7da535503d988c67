import math

import pytest
import torch

from h3de.config import LossConfig
from h3de.losses import BallHardNegativeLoss, SpatialCrossEntropyLoss, WeightedMSELoss, build_loss
from h3de.targets import decode_heatmaps, gaussian_heatmaps


def targets():
    points = torch.tensor([[[5.2, 6.7, 4.1], [9.0, 3.3, 8.8], [float("nan")] * 3]])
    heat = gaussian_heatmaps(points, (14, 12, 13), 1.5)
    mask = torch.tensor([[True, True, False]])
    return points, heat, mask


@pytest.mark.parametrize("loss", [WeightedMSELoss(20.0, 1.0), SpatialCrossEntropyLoss()])
def test_loss_is_zero_at_the_target_and_ignores_masked_landmarks(loss):
    points, heat, mask = targets()
    perfect = heat.clamp_min(1e-12).log() if loss.log_domain else heat.clone()
    assert loss(perfect, heat, mask).item() == pytest.approx(0.0, abs=1e-5)
    prediction = perfect.clone().requires_grad_(True)
    wrong = prediction + torch.randn_like(prediction)  # noise everywhere
    value = loss(wrong, heat, mask)
    assert value.item() > 0
    value.backward()
    assert prediction.grad[0, 2].abs().max() == 0  # the absent landmark gets no gradient
    assert prediction.grad[0, :2].abs().max() > 0
    # the decoder matching the loss's output domain recovers the landmarks from a perfect output
    decoded = decode_heatmaps(perfect, log_input=loss.log_domain)[0, :2]
    assert (decoded - points[0, :2]).abs().max() < 1e-3


def test_nothing_masked_gives_zero_loss():
    _, heat, _ = targets()
    none = torch.zeros(1, 3, dtype=torch.bool)
    for loss in (WeightedMSELoss(), SpatialCrossEntropyLoss()):
        assert loss(torch.randn_like(heat), heat, none).item() == 0.0


def test_weighted_mse_weights_the_peak_region():
    _, heat, mask = targets()
    peak_error, tail_error = heat.clone(), heat.clone()
    peak_error[heat > 0.5] += 0.1  # error only where the target exceeds 0.1
    tail_error[heat < 0.01] += 0.1  # error only in the background
    weighted, plain = WeightedMSELoss(foreground_weight=20.0), WeightedMSELoss(foreground_weight=0.0)
    assert weighted(peak_error, heat, mask) / plain(peak_error, heat, mask) == pytest.approx(21.0)
    assert weighted(tail_error, heat, mask) == pytest.approx(plain(tail_error, heat, mask).item())


def test_build_loss_from_config():
    assert isinstance(build_loss(LossConfig(name="spatial_ce"), 1.5), SpatialCrossEntropyLoss)
    ball = build_loss(LossConfig(name="ball_ohnm", ball_radius=2.0, negative_ratio=2.0, hard_negatives=7), 1.0)
    assert isinstance(ball, BallHardNegativeLoss) and ball.hard_negatives == 7
    assert ball.threshold == pytest.approx(math.exp(-2.0))
    mse = build_loss(LossConfig(name="weighted_mse", foreground_weight=3.0, target_scale=2.0), 1.5)
    assert isinstance(mse, WeightedMSELoss) and mse.foreground_weight == 3.0 and mse.target_scale == 2.0


def test_ball_loss_positives_and_mined_negatives():
    points, heat, mask = targets()  # landmark 2 is absent
    loss = BallHardNegativeLoss(sigma=1.5, radius=2.0, negative_ratio=1.0, hard_negatives=4)
    ball = heat >= loss.threshold
    assert ball[0, 2].sum() == 0 and 20 < ball[0, 0].sum() < 40  # ~ the voxels within 2 of the point
    logits = torch.where(ball, 8.0, -8.0)
    low = loss(logits, heat, mask)
    # a false detection on the absent landmark is one of its 4 mined negatives: the loss rises
    false_alarm = logits.clone()
    false_alarm[0, 2, 3, 3, 3] = 8.0
    # BCE(8, 0) - BCE(-8, 0) = 8, over 4 mined negatives, averaged over 3 landmarks
    assert (loss(false_alarm, heat, mask) - low).item() == pytest.approx(8 / 4 / 3, rel=1e-3)
    # raising a far background voxel of a present landmark costs exactly as a mined negative
    background = logits.clone()
    background[0, 0, 13, 11, 12] = 5.0
    assert loss(background, heat, mask) > low
    # the decoded position and the presence probability
    decoded = decode_heatmaps(loss.decodable(heat.clamp(1e-6, 1 - 1e-6).logit()), log_input=True)
    assert (decoded[0, :2] - points[0, :2]).abs().max() < 0.05
    assert loss.presence(logits)[0].tolist() == pytest.approx([1.0, 1.0, 0.0], abs=1e-3)


def test_ball_loss_bad_arguments():
    with pytest.raises(ValueError, match="radius"):
        BallHardNegativeLoss(sigma=1.0, radius=0.5)
