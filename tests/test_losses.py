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


@pytest.mark.parametrize("loss", [WeightedMSELoss(20.0, 1.0), SpatialCrossEntropyLoss(3)])
def test_loss_is_minimal_at_the_target_and_trains_absent_landmarks(loss):
    points, heat, mask = targets()
    if loss.log_domain:  # present: the Gaussian, raised far above the absent logit; absent: far below
        perfect = torch.where(mask[..., None, None, None], heat.clamp_min(1e-12).log() + 30.0, -30.0)
    else:
        perfect = heat.clone()  # the absent landmark's target is the all-zero heatmap
    assert loss(perfect, heat, mask).item() == pytest.approx(0.0, abs=1e-5)
    presence = loss.presence(perfect)[0]
    assert presence[:2].min() > 0.95 and presence[2] < 1e-5  # (a sub-voxel peak of the Gaussian is below 1)
    prediction = perfect.clone().requires_grad_(True)
    wrong = prediction + torch.randn_like(prediction)  # noise everywhere
    value = loss(wrong, heat, mask)
    assert value.item() > 0
    value.backward()
    assert prediction.grad[0, 2].abs().max() > 0  # the absent landmark is trained toward "absent"
    assert prediction.grad[0, :2].abs().max() > 0
    # the decoder matching the loss's output domain recovers the landmarks from a perfect output
    decoded = decode_heatmaps(perfect, log_input=loss.log_domain)[0, :2]
    assert (decoded - points[0, :2]).abs().max() < 1e-3


def test_weighted_mse_trains_absent_landmarks_toward_zero():
    _, heat, mask = targets()
    loss = WeightedMSELoss(foreground_weight=20.0)
    false_peak = heat.clone()
    false_peak[0, 2] = heat[0, 0]  # a peak in the absent landmark's heatmap
    # its error is the peak's unweighted squared sum, averaged over the voxels and the 3 landmarks
    expected = (heat[0, 0] ** 2).mean().item() / 3
    assert loss(false_peak, heat, mask).item() == pytest.approx(expected, rel=1e-5)
    # a target in the heatmap of a landmark outside the mask is ignored: the mask decides
    assert loss(heat, heat, torch.zeros_like(mask)).item() == pytest.approx((heat**2).mean().item(), rel=1e-5)


def test_spatial_ce_presence_is_one_minus_the_absent_probability():
    _, heat, mask = targets()
    loss = SpatialCrossEntropyLoss(3)
    n = heat[0, 0].numel()
    flat = torch.zeros_like(heat)  # logsumexp = log N: the absent logit's offset
    assert loss.presence(flat)[0].tolist() == pytest.approx([0.5] * 3)
    with torch.no_grad():
        loss.absent_logit.copy_(torch.tensor([0.0, math.log(3.0), -math.log(3.0)]))
    # presence = sigmoid(logsumexp(x) - log N - absent_logit): 1/2, 1/(1 + 3), 3/(3 + 1)
    assert loss.presence(flat)[0].tolist() == pytest.approx([0.5, 0.25, 0.75], abs=1e-6)
    with torch.no_grad():
        loss.absent_logit.zero_()
    sharp = torch.full_like(heat, -50.0)
    sharp[..., 4, 5, 6] = math.log(n) + 12.0  # a sharp peak 12 above the absent logit log N
    assert loss.presence(sharp)[0, 0].item() == pytest.approx(1 / (1 + math.exp(-12.0)), rel=1e-6)  # 0.999994
    assert loss.presence(sharp - 24.0)[0, 0].item() == pytest.approx(1 / (1 + math.exp(12.0)), rel=1e-4)  # 6e-6
    # the cross-entropy of the (N + 1)-category softmax: -log p(absent) for the landmark outside the mask
    x = torch.randn_like(heat)
    value = loss(x, heat, torch.zeros_like(mask))  # all three trained as absent
    logits = torch.cat([x.flatten(2), (math.log(n) + loss.absent_logit.detach())[None, :, None]], dim=-1)
    expected = -torch.log_softmax(logits, dim=-1)[..., -1].mean()
    assert value.item() == pytest.approx(expected.item(), rel=1e-5)
    value.backward()
    assert loss.absent_logit.grad.abs().min() > 0  # the absent logit is learned


def test_spatial_ce_is_stable_in_bf16_and_for_huge_logits():
    _, heat, mask = targets()
    loss = SpatialCrossEntropyLoss(3)
    x = (torch.randn_like(heat) * 1e3).requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = loss(x.bfloat16(), heat, mask)
        presence = loss.presence(x.bfloat16())
    assert value.dtype == torch.float32 and torch.isfinite(value)
    assert presence.dtype == torch.float32 and torch.isfinite(presence).all()
    value.backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(loss.absent_logit.grad).all()


@pytest.mark.parametrize("name", ["spatial_ce", "weighted_mse", "ball_ohnm"])
def test_a_few_steps_separate_present_from_absent(name):
    """Free outputs fitted for a few steps on 2 samples in which landmark 1 is absent from the first."""
    torch.manual_seed(0)
    points = torch.tensor([[[3.0, 4.0, 5.0], [6.0, 6.0, 5.0]], [[4.0, 3.0, 6.0], [5.0, 6.5, 6.0]]])
    mask = torch.tensor([[True, False], [True, True]])
    heat = gaussian_heatmaps(torch.where(mask[..., None], points, torch.nan), (8, 8, 8), 1.0)  # (2, 2, 8, 8, 8)
    loss = build_loss(LossConfig(name=name), 1.0, 2)
    output = (0.1 * torch.randn_like(heat)).requires_grad_(True)
    optimizer = torch.optim.Adam([output, *loss.parameters()], lr=0.05)
    before = loss.presence(output)
    for _ in range(60):
        optimizer.zero_grad()
        loss(output, heat, mask).backward()
        optimizer.step()
    presence = loss.presence(output)
    assert presence[mask].min() > 0.5 > presence[~mask].max(), (before, presence)


def test_nothing_masked_trains_every_landmark_as_absent():
    _, heat, _ = targets()
    none = torch.zeros(1, 3, dtype=torch.bool)
    assert WeightedMSELoss()(torch.zeros_like(heat), heat, none).item() == 0.0
    assert SpatialCrossEntropyLoss(3)(torch.full_like(heat, -40.0), heat, none).item() < 1e-6


def test_weighted_mse_weights_the_peak_region():
    _, heat, mask = targets()
    peak_error, tail_error = heat.clone(), heat.clone()
    peak_error[heat > 0.5] += 0.1  # error only where the target exceeds 0.1
    tail_error[heat < 0.01] += 0.1  # error only in the background
    weighted, plain = WeightedMSELoss(foreground_weight=20.0), WeightedMSELoss(foreground_weight=0.0)
    assert weighted(peak_error, heat, mask) / plain(peak_error, heat, mask) == pytest.approx(21.0)
    assert weighted(tail_error, heat, mask) == pytest.approx(plain(tail_error, heat, mask).item())


def test_build_loss_from_config():
    ce = build_loss(LossConfig(name="spatial_ce"), 1.5, 4)
    assert isinstance(ce, SpatialCrossEntropyLoss) and ce.absent_logit.shape == (4,)
    ball = build_loss(LossConfig(name="ball_ohnm", ball_radius=2.0, negative_ratio=2.0, hard_negatives=7), 1.0, 4)
    assert isinstance(ball, BallHardNegativeLoss) and ball.hard_negatives == 7
    assert ball.threshold == pytest.approx(math.exp(-2.0))
    mse = build_loss(LossConfig(name="weighted_mse", foreground_weight=3.0, target_scale=2.0), 1.5, 4)
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


def test_spatial_ce_presence_keeps_the_training_volume_size_at_inference():
    from h3de.losses import SpatialCrossEntropyLoss

    loss = SpatialCrossEntropyLoss(1)
    logits = torch.full((1, 1, 8, 8, 8), -8.0)
    logits[0, 0, 4, 4, 4] = 6.0
    loss(logits, torch.zeros_like(logits), torch.ones(1, 1, dtype=torch.bool))  # a training step at 8^3
    before = loss.presence(logits)
    larger = torch.full((1, 1, 16, 16, 16), -8.0)  # the same peak in a scan with 8x the voxels, all background
    larger[0, 0, 4, 4, 4] = 6.0
    after = loss.presence(larger)
    assert abs(after.item() - before.item()) < 0.01, (before, after)
    untrained = SpatialCrossEntropyLoss(1)  # no training size known: the scan's own, log 8 lower
    assert untrained.presence(larger).item() < before.item() - 0.2
    assert torch.isclose(loss.train_log_voxels, torch.tensor(math.log(512.0)))


@pytest.mark.parametrize("name", ["spatial_ce", "weighted_mse", "ball_ohnm"])
@pytest.mark.parametrize("magnitude", [3.0, 1e3])
def test_every_heatmap_loss_is_finite_under_bf16_autocast(name, magnitude):
    """bf16-mixed: a bfloat16 network output gives a finite float32 loss and gradients, equal to the float32 loss of
    the same (bfloat16-rounded) values."""
    torch.manual_seed(1)
    _, heat, mask = targets()
    loss = build_loss(LossConfig(name=name), 1.5, 3)
    x = (torch.randn_like(heat) * magnitude).bfloat16().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = loss(x, heat, mask)
        presence = loss.presence(x)
    assert value.dtype == torch.float32 and torch.isfinite(value)
    assert torch.isfinite(presence).all() and ((presence >= 0) & (presence <= 1)).all()
    value.backward()
    assert torch.isfinite(x.grad.float()).all()
    assert all(torch.isfinite(p.grad).all() for p in loss.parameters())
    reference = loss(x.detach().float(), heat, mask)
    assert value.item() == pytest.approx(reference.item(), rel=1e-3)
