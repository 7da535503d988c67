import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from h3de.anchors import (
    ANCHOR_SIZES,
    AnchorLoss,
    AnchorTargets,
    anchor_channels,
    decode_anchors,
    encode_anchor_targets,
    init_anchor_head_,
    split_anchor_output,
    vote_candidates,
)

NAN = float("nan")


def assemble(logits: torch.Tensor, raw: torch.Tensor) -> torch.Tensor:
    """(B, L*A*4, d, h, w) output from logits (B, L, A, d, h, w) and raw offsets (B, L, A, 3, d, h, w)."""
    b, l, a, d, h, w = logits.shape
    return torch.cat([logits[:, :, :, None], raw], dim=3).reshape(b, l * a * 4, d, h, w)


def ideal_output(targets: AnchorTargets, magnitude: float = 20.0) -> torch.Tensor:
    """The output a perfect network would give: +-magnitude logits, offsets inverting the tanh bound."""
    logits = torch.where(targets.positive, magnitude, -magnitude)  # (B, L, A, d, h, w)
    raw = torch.atanh(targets.offsets.clamp(-1 + 1e-6, 1 - 1e-6))  # (B, L, A, 3, d, h, w), 0 at negatives
    return assemble(logits, raw)


def random_points(num: int, grid, stride: int, generator: torch.Generator) -> torch.Tensor:
    """(num, 3) points covering the grid [-0.5, stride*n - 0.5): uniform, corners and cell boundaries."""
    extent = stride * torch.tensor(grid, dtype=torch.float32)
    uniform = torch.rand(num, 3, generator=generator) * extent - 0.5
    corners = torch.stack([torch.full((3,), -0.5), extent - 0.5 - 1e-3])
    boundaries = stride * torch.randint(0, min(grid), (4, 3), generator=generator).float() - 0.5
    return torch.cat([uniform, corners, boundaries])


def cell_centre(i: int, stride: int) -> float:
    return stride * (i + 0.5) - 0.5


def test_channels_and_split_layout():
    assert anchor_channels(3, 4) == 48
    output = torch.arange(2 * 48 * 2 * 3 * 4, dtype=torch.float32).reshape(2, 48, 2, 3, 4)
    logits, offsets = split_anchor_output(output, 3, 4)
    assert logits.shape == (2, 3, 4, 2, 3, 4) and offsets.shape == (2, 3, 4, 3, 2, 3, 4)
    # channel (l * A + a) * 4 + k: k = 0 logit, k = 1..3 offset along d, h, w
    l, a = 2, 1
    assert torch.equal(logits[:, l, a], output[:, (l * 4 + a) * 4])
    for axis in range(3):
        assert torch.equal(offsets[:, l, a, axis], output[:, (l * 4 + a) * 4 + 1 + axis])


@pytest.mark.parametrize(("stride", "grid"), [(4, (5, 6, 7)), (2, (3, 8, 4)), (1, (6, 5, 6)), (3, (4, 4, 2))])
def test_ideal_output_round_trip(stride, grid):
    generator = torch.Generator().manual_seed(stride)
    points = random_points(40, grid, stride, generator).reshape(2, -1, 3)  # (B, L, 3)
    present = torch.ones(points.shape[:2], dtype=torch.bool)
    present[1, ::5] = False
    targets = encode_anchor_targets(points, present, grid, stride)
    assert targets.positive.shape == (2, points.shape[1], len(ANCHOR_SIZES), *grid)
    assert torch.equal(targets.present, present)

    positions, presence = decode_anchors(ideal_output(targets), points.shape[1], stride)
    assert positions.shape == points.shape and presence.shape == present.shape
    assert (positions[present] - points[present]).abs().max() < 1e-3  # voxels, far below a cell
    assert (presence[present] > 0.999).all() and (presence[~present] < 1e-3).all()
    assert torch.isfinite(positions).all()  # no threshold: absent landmarks' positions are returned too


def test_offset_targets_decode_to_the_point():
    stride, grid = 4, (3, 3, 3)
    points = torch.tensor([[[5.3, 1.0, 9.9]]])
    targets = encode_anchor_targets(points, None, grid, stride)
    b, l, a, i, j, k = targets.positive.nonzero(as_tuple=True)
    centres = torch.tensor([[cell_centre(int(x), stride) for x in idx] for idx in zip(i, j, k, strict=True)])
    half = stride * torch.tensor(ANCHOR_SIZES)[a] / 2
    offsets = targets.offsets[b, l, a, :, i, j, k]  # (N, 3)
    assert offsets.abs().max() <= 1.0
    assert torch.allclose(centres + half[:, None] * offsets, points[0, 0].expand_as(centres), atol=1e-5)
    assert (targets.offsets[:, :, :, 0][~targets.positive] == 0).all()


@pytest.mark.parametrize("sizes", [ANCHOR_SIZES, (1.0,), (0.5, 1.0), (2.0,)])
def test_every_point_of_the_grid_has_a_positive(sizes):
    stride, grid = 4, (4, 3, 5)
    points = random_points(500, grid, stride, torch.Generator().manual_seed(7))[None]
    targets = encode_anchor_targets(points, None, grid, stride, sizes)
    assert (targets.positive.flatten(2).sum(-1) >= 1).all()
    if sizes == (1.0,):
        # unit anchors tile the grid: a point strictly inside a cell has exactly one positive
        strictly_inside = ((points + 0.5) % stride != 0).all(-1)
        assert (targets.positive.flatten(2).sum(-1)[strictly_inside] == 1).all()


def test_containment_is_the_closed_anchor_cube():
    stride, grid = 4, (4, 1, 1)
    # centre of cell 1 is 5.5; size-0.5 anchor half-extent 1 voxel, size-1.25 half-extent 2.5 voxels
    points = torch.tensor([[[6.5, 1.5, 1.5], [6.6, 1.5, 1.5], [8.0, 1.5, 1.5], [8.1, 1.5, 1.5]]])
    positive = encode_anchor_targets(points, None, grid, stride).positive  # (1, 4, A, 4, 1, 1)
    assert positive[0, 0, 0, 1, 0, 0] and not positive[0, 1, 0, 1, 0, 0]
    assert positive[0, 2, 3, 1, 0, 0] and not positive[0, 3, 3, 1, 0, 0]


def test_missing_and_outside_landmarks_have_no_positives():
    stride, grid = 2, (3, 3, 3)
    points = torch.tensor([[[2.0, 2.0, 2.0], [NAN, NAN, NAN], [2.0, 2.0, 2.0], [-0.6, 1.0, 1.0], [1.0, 5.5, 1.0]]])
    present = torch.tensor([[True, True, False, True, True]])
    targets = encode_anchor_targets(points, present, grid, stride)
    assert targets.present.tolist() == [[True, False, False, False, False]]
    assert targets.positive[0, 0].any() and not targets.positive[0, 1:].any()
    assert (targets.offsets[0, 1:] == 0).all()


def test_loss_is_zero_for_the_ideal_output_and_positive_otherwise():
    stride, grid = 4, (4, 5, 3)
    points = torch.tensor([[[3.3, 10.2, 7.9], [NAN, NAN, NAN]], [[0.1, 18.9, 1.0], [14.0, 2.5, 11.4]]])
    present = torch.tensor([[True, False], [True, True]])
    loss = AnchorLoss(stride=stride)
    ideal = ideal_output(encode_anchor_targets(points, present, grid, stride))
    parts = loss(ideal, points, present)
    assert parts.total.dtype == torch.float32
    assert parts.total.item() < 1e-5 and parts.cls.item() < 1e-5 and parts.offset.item() < 1e-5

    noisy = loss(torch.randn(ideal.shape, generator=torch.Generator().manual_seed(0)), points, present)
    assert noisy.cls.item() > 0.1 and noisy.offset.item() > 1e-3

    # wrong offsets at one positive: only the offset part grows
    targets = encode_anchor_targets(points, present, grid, stride)
    shifted = ideal.clone()
    _, offsets = split_anchor_output(shifted, 2, len(ANCHOR_SIZES))
    b, l, a, i, j, k = (int(x[0]) for x in targets.positive.nonzero(as_tuple=True))
    offsets[b, l, a, :, i, j, k] += 1.0
    moved = loss(shifted, points, present)
    assert moved.offset.item() > 1e-3 and moved.cls.item() < 1e-5


def test_loss_weights():
    stride, grid = 2, (3, 3, 3)
    points = torch.tensor([[[1.2, 3.4, 2.2], [NAN, NAN, NAN]]])
    output = torch.randn(1, anchor_channels(2, 4), *grid, generator=torch.Generator().manual_seed(1))
    base = AnchorLoss(stride=stride)(output, points, None)
    assert torch.isclose(base.total, base.cls + base.offset)
    double = AnchorLoss(stride=stride, offset_weight=2.0)(output, points, None)
    assert torch.isclose(double.total, base.cls + 2 * base.offset)
    no_missing = AnchorLoss(stride=stride, missing_weight=0.0)(output, points, None)
    assert no_missing.cls < base.cls
    only_missing = AnchorLoss(stride=stride)(output[:, 16:], points[:, 1:], None)
    assert torch.isclose(no_missing.cls + only_missing.cls, base.cls)


def test_hard_negative_mining_of_missing_landmarks():
    stride, grid, k = 2, (4, 4, 4), 5
    points = torch.full((1, 1, 3), NAN)
    hard = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    flat_index = torch.tensor([3, 70, 101, 150, 255])  # of A*d*h*w = 256 anchors

    def output_with(extra: dict[int, float]) -> torch.Tensor:
        logits = torch.full((1, 1, 4, *grid), -30.0)
        logits.view(-1)[flat_index] = hard
        for index, value in extra.items():
            logits.view(-1)[index] = value
        return assemble(logits, torch.zeros(1, 1, 4, 3, *grid))

    loss = AnchorLoss(stride=stride, hard_negatives=k)
    output = output_with({}).requires_grad_(True)
    parts = loss(output, points, None)
    assert parts.cls.item() == pytest.approx(F.softplus(hard).mean().item(), rel=1e-5)
    assert parts.offset.item() == 0
    parts.total.backward()
    grad_logits, grad_offsets = split_anchor_output(output.grad, 1, 4)
    assert (grad_logits.reshape(-1)[flat_index] > 0).all()
    assert grad_logits.count_nonzero() == k and grad_offsets.count_nonzero() == 0

    # a negative below the k hardest does not matter; one above them replaces the weakest
    assert loss(output_with({40: 0.5}), points, None).cls.item() == pytest.approx(parts.cls.item(), rel=1e-6)
    expected = F.softplus(torch.tensor([2.0, 3.0, 4.0, 5.0, 6.0])).mean().item()
    assert loss(output_with({40: 6.0}), points, None).cls.item() == pytest.approx(expected, rel=1e-5)
    # fewer mined anchors: only the hardest ones count
    top3 = AnchorLoss(stride=stride, hard_negatives=3)(output, points, None).cls.item()
    assert top3 == pytest.approx(F.softplus(hard[2:]).mean().item(), rel=1e-5)


def test_present_landmarks_use_unbalanced_bce_normalised_by_the_positives():
    stride, grid = 2, (3, 4, 3)
    points = torch.tensor([[[2.2, 3.9, 0.4], [1.0, 5.5, 4.1]], [[0.3, 0.2, 5.1], [3.3, 1.4, 2.0]]])
    output = torch.randn(2, anchor_channels(2, 4), *grid, generator=torch.Generator().manual_seed(5))
    positive = encode_anchor_targets(points, None, grid, stride).positive
    logits, _ = split_anchor_output(output, 2, 4)
    expected = F.binary_cross_entropy_with_logits(logits, positive.float(), reduction="sum") / positive.sum()
    assert AnchorLoss(stride=stride)(output, points, None).cls.item() == pytest.approx(expected.item(), rel=1e-5)

    # unbalanced: one false peak costs as much as one equally wrong positive, however rare positives are
    ideal = ideal_output(encode_anchor_targets(points, None, grid, stride), magnitude=5.0)
    base = AnchorLoss(stride=stride)(ideal, points, None).cls
    false_peak, missed = ideal.clone(), ideal.clone()
    negative_at = (~positive).nonzero()[0].tolist()
    positive_at = positive.nonzero()[0].tolist()
    split_anchor_output(false_peak, 2, 4)[0][tuple(negative_at)] = 5.0
    split_anchor_output(missed, 2, 4)[0][tuple(positive_at)] = -5.0
    cost_false = AnchorLoss(stride=stride)(false_peak, points, None).cls - base
    cost_missed = AnchorLoss(stride=stride)(missed, points, None).cls - base
    assert cost_false.item() == pytest.approx(cost_missed.item(), rel=1e-5) and cost_false.item() > 0.01


def test_anchor_head_init_sets_the_logit_biases_to_the_prior_and_the_offset_biases_to_zero():
    conv = nn.Conv3d(8, anchor_channels(3, 4), 1)
    init_anchor_head_(conv, prior=1e-3)
    logits, raw = split_anchor_output(conv(torch.zeros(1, 8, 2, 2, 2)), 3, 4)
    assert torch.allclose(torch.sigmoid(logits), torch.full_like(logits, 1e-3), rtol=1e-4)
    assert (raw == 0).all()
    with pytest.raises(ValueError, match="prior.*1.5"):
        init_anchor_head_(conv, prior=1.5)
    with pytest.raises(ValueError, match="multiple of 4"):
        init_anchor_head_(nn.Conv3d(8, 6, 1))


def test_negatives_of_present_landmarks_are_all_supervised_and_offsets_only_at_positives():
    stride, grid = 2, (3, 4, 3)
    points = torch.tensor([[[2.2, 3.9, 0.4], [NAN, NAN, NAN]]])
    output = torch.randn(1, anchor_channels(2, 4), *grid, generator=torch.Generator().manual_seed(3))
    output.requires_grad_(True)
    AnchorLoss(stride=stride, hard_negatives=4)(output, points, None).total.backward()
    grad_logits, grad_offsets = split_anchor_output(output.grad, 2, 4)
    positive = encode_anchor_targets(points, None, grid, stride).positive
    assert (grad_logits[0, 0] != 0).all()  # dense: every anchor of the present landmark
    assert grad_logits[0, 1].count_nonzero() == 4  # mined: only the 4 hardest of the missing one
    assert (grad_offsets.movedim(3, -1)[~positive] == 0).all()
    assert (grad_offsets.movedim(3, -1)[positive].abs().sum(-1) > 0).all()


def test_loss_under_bf16_autocast_is_finite():
    torch.manual_seed(0)
    stride, grid = 4, (3, 3, 3)
    net = nn.Conv3d(2, anchor_channels(3, 4), 3, padding=1)
    points = torch.tensor([[[3.1, 5.0, 9.7], [NAN, NAN, NAN], [10.0, 1.2, 0.0]]])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        output = net(torch.randn(1, 2, *grid))
        assert output.dtype == torch.bfloat16
        parts = AnchorLoss(stride=stride)(output, points, None)
    assert parts.total.dtype == torch.float32 and torch.isfinite(parts.total)
    parts.total.backward()
    assert all(torch.isfinite(p.grad).all() for p in net.parameters())
    positions, presence = decode_anchors(output, 3, stride)
    assert torch.isfinite(positions).all() and torch.isfinite(presence).all()


@pytest.mark.parametrize("weights", [None, torch.linspace(1.0, 0.6, 15)])
def test_vote_ignores_outliers(weights):
    generator = torch.Generator().manual_seed(4)
    target = torch.tensor([20.0, 30.0, 10.0])
    inliers = target + 0.3 * torch.randn(11, 3, generator=generator)
    outliers = torch.tensor([[60.0, 30.0, 10.0], [62.0, 31.0, 9.0], [58.0, 80.0, 12.0], [61.0, 29.0, 50.0]])
    candidates = torch.cat([outliers[:2], inliers, outliers[2:]])  # (15, 3), outliers among the first
    voted = vote_candidates(candidates, weights)
    assert (voted - target).norm() < 1.0
    assert any(torch.equal(voted, c) for c in inliers)  # the vote returns one of the candidates
    assert (candidates.mean(0) - target).norm() > 5.0


def test_vote_ties_go_to_the_first_candidate():
    a, b = torch.zeros(3), torch.tensor([4.0, 0.0, 0.0])
    assert torch.equal(vote_candidates(torch.stack([a, b, a, b])), a)
    assert torch.equal(vote_candidates(torch.stack([b, a, b, a])), b)
    assert torch.equal(vote_candidates(torch.stack([b, a, a]), torch.zeros(3)), b)


def test_decode_votes_over_the_top_candidates():
    stride, grid, a = 4, (8, 8, 8), len(ANCHOR_SIZES)
    logits, offsets = torch.full((1, 1, a, *grid), -10.0), torch.zeros(1, 1, a, 3, *grid)
    target = torch.tensor([cell_centre(4, stride)] * 3) + 0.7  # 18.2 in each axis
    cluster = [(4, 4, 4), (4, 4, 5), (4, 5, 4), (5, 4, 4), (3, 4, 4), (4, 3, 4), (4, 4, 3)]
    for n, (i, j, k) in enumerate(cluster):
        for anchor in (2, 3) if n < 4 else (3,):  # 11 candidates pointing near the target
            half = stride * ANCHOR_SIZES[anchor] / 2
            centre = torch.tensor([cell_centre(x, stride) for x in (i, j, k)])
            wanted = ((target - centre) / half).clamp(-0.95, 0.95)
            logits[0, 0, anchor, i, j, k] = 3.0
            offsets[0, 0, anchor, :, i, j, k] = torch.atanh(wanted)
    for i, j, k in [(0, 0, 0), (7, 7, 7), (0, 7, 0), (7, 0, 7)]:  # 4 far outliers, the most confident
        logits[0, 0, 3, i, j, k] = 4.0
    output = assemble(logits, offsets)
    positions, presence = decode_anchors(output, 1, stride)
    assert (positions[0, 0] - target).norm() < 1e-4  # the medoid is a candidate decoded onto the target
    assert presence[0, 0].item() == pytest.approx(torch.sigmoid(torch.tensor(4.0)).item())
    # with a single candidate the best logit wins, which here is an outlier
    alone, _ = decode_anchors(output, 1, stride, top_candidates=1)
    assert (alone[0, 0] - target).norm() > 10


def test_weighted_vote_follows_confident_candidates():
    stride, grid = 2, (6, 6, 6)
    logits = torch.full((1, 1, 1, *grid), -30.0)  # one size-1 anchor
    logits[0, 0, 0, 1, 1, 1] = logits[0, 0, 0, 1, 1, 2] = 8.0  # two confident candidates
    logits[0, 0, 0, 4:, 4:, 4:] = -6.0  # eight unlikely ones, clustered far away
    output = assemble(logits, torch.zeros(1, 1, 1, 3, *grid))  # zero offsets: candidates at cell centres
    weighted, _ = decode_anchors(output, 1, stride, anchor_sizes=(1.0,), top_candidates=10)
    plain, _ = decode_anchors(output, 1, stride, anchor_sizes=(1.0,), top_candidates=10, weighted_vote=False)
    assert weighted[0, 0].tolist() == [2.5, 2.5, 2.5] or weighted[0, 0].tolist() == [2.5, 2.5, 4.5]
    assert (plain[0, 0] >= 8.5).all()


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: anchor_channels(0, 4), "num_landmarks.*0"),
        (lambda: anchor_channels(2, -1), "num_anchors.*-1"),
        (lambda: split_anchor_output(torch.zeros(1, 30, 2, 2, 2), 2, 4), "30 channels.*32"),
        (lambda: split_anchor_output(torch.zeros(32, 2, 2, 2), 2, 4), r"shape \(32, 2, 2, 2\)"),
        (lambda: encode_anchor_targets(torch.zeros(1, 1, 3), None, (2, 2, 2), 0), "stride.*0"),
        (lambda: encode_anchor_targets(torch.zeros(1, 1, 3), None, (2, 2, 2), 2.5), "stride.*2.5"),
        (lambda: encode_anchor_targets(torch.zeros(1, 1, 3), None, (2, 2, 2), 4, ()), r"anchor_sizes.*\(\)"),
        (lambda: encode_anchor_targets(torch.zeros(1, 1, 3), None, (2, 2, 2), 4, (1.0, -0.5)), "-0.5"),
        (lambda: encode_anchor_targets(torch.zeros(1, 1, 3), None, (2, 2, 2), 4, (0.5, 0.75)), "0.75"),
        (lambda: encode_anchor_targets(torch.zeros(1, 1, 3), None, (2, 0, 2), 4), r"grid_size.*\(2, 0, 2\)"),
        (lambda: encode_anchor_targets(torch.zeros(1, 3), None, (2, 2, 2), 4), r"points_voxel.*\(1, 3\)"),
        (
            lambda: encode_anchor_targets(torch.zeros(1, 2, 3), torch.ones(2), (2, 2, 2), 4),
            r"present.*\(2,\)",
        ),
        (lambda: AnchorLoss(hard_negatives=0), "hard_negatives.*0"),
        (lambda: AnchorLoss(offset_weight=-1.0), "offset_weight.*-1.0"),
        (lambda: AnchorLoss(missing_weight=math.nan), "missing_weight.*nan"),
        (lambda: AnchorLoss(offset_beta=0.0), "offset_beta.*0.0"),
        (lambda: AnchorLoss(stride=0), "stride.*0"),
        (lambda: decode_anchors(torch.zeros(1, 16, 2, 2, 2), 1, 4, top_candidates=0), "top_candidates.*0"),
        (lambda: decode_anchors(torch.zeros(1, 16, 2, 2, 2), 2, 4), "16 channels.*32"),
    ],
)
def test_bad_arguments_raise_value_error_naming_the_value(call, match):
    with pytest.raises(ValueError, match=match):
        call()
