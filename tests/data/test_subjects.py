import numpy as np
import pytest

from h3de.data.subjects import SubjectRanges, make_subject, sample_subject

SHAPE = (56, 64, 52)
VOXEL_MM = 2.0
STILL = dict(bias_coeff=0.0, log_gamma=0.0, noise=(0.0, 0.0))  # geometry only: blobs keep their shape and height
IDENTITY = SubjectRanges(rotate_deg=0.0, scale=0.0, translate_mm=0.0, elastic_magnitude_mm=0.0, **STILL)


def grid_affine() -> np.ndarray:
    affine = np.diag([VOXEL_MM, VOXEL_MM, VOXEL_MM, 1.0])
    affine[:3, 3] = [-40.0, -55.0, -35.0]
    return affine


def blob_volume(voxels: np.ndarray, sigma: float = 1.6) -> np.ndarray:
    """One Gaussian blob (peak 100) at each continuous voxel position."""
    grid = np.stack(np.meshgrid(*[np.arange(s, dtype=np.float64) for s in SHAPE], indexing="ij"), -1)
    volume = np.zeros(SHAPE, dtype=np.float32)
    for v in voxels:
        volume += 100 * np.exp(-((grid - v) ** 2).sum(-1) / (2 * sigma**2)).astype(np.float32)
    return volume


def peak(image: np.ndarray, near: np.ndarray, search: int = 4, radius: int = 3) -> np.ndarray:
    """Sub-voxel blob centre: the brightest voxel within ``search`` of ``near``, refined by the weighted centroid of
    the window of ``radius`` around that voxel (independent of where the landmark was predicted)."""
    lo = np.maximum(np.round(near).astype(int) - search, 0)
    box = image[lo[0] : lo[0] + 2 * search + 1, lo[1] : lo[1] + 2 * search + 1, lo[2] : lo[2] + 2 * search + 1]
    top = lo + np.array(np.unravel_index(np.argmax(box), box.shape))
    a, b = top - radius, top + radius + 1
    window = image[a[0] : b[0], a[1] : b[1], a[2] : b[2]].astype(np.float64)
    axes = np.meshgrid(*[np.arange(i, j, dtype=np.float64) for i, j in zip(a, b, strict=True)], indexing="ij")
    return np.array([(window * g).sum() / window.sum() for g in axes])


def landmark_voxels() -> np.ndarray:
    centre = (np.array(SHAPE) - 1) / 2
    offsets = np.array([[-9.0, 0.3, 0.2], [9.3, -0.4, 0.1], [0.2, 11.6, -0.3], [0.4, -11.2, 7.7], [-0.3, 0.6, -8.6]])
    return centre + offsets


def test_zero_ranges_are_the_identity():
    affine = grid_affine()
    voxels = landmark_voxels()
    volume = blob_volume(voxels)
    world = voxels @ affine[:3, :3].T + affine[:3, 3]
    image, moved = make_subject(volume, affine, world, sample_subject(np.random.default_rng(0), IDENTITY), IDENTITY)
    assert image.shape == SHAPE and image.dtype == np.float32
    assert np.abs(image - volume).max() < 1e-3 * volume.max()
    assert np.abs(moved - world).max() < 1e-6


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_blobs_move_with_their_landmarks_within_half_a_voxel(seed):
    """Strong pose + elastic deformation: each blob's centre in the subject is where its landmark moved."""
    ranges = SubjectRanges(**STILL)  # the default pose and elastic ranges
    affine = grid_affine()
    voxels = landmark_voxels()
    world = voxels @ affine[:3, :3].T + affine[:3, 3]
    subject = sample_subject(np.random.default_rng(seed), ranges)
    image, moved = make_subject(blob_volume(voxels), affine, world, subject, ranges)
    moved_voxels = (moved - affine[:3, 3]) @ np.linalg.inv(affine[:3, :3]).T
    assert np.linalg.norm(moved - world, axis=-1).mean() > 3.0  # mm: the deformation is strong
    found = np.stack([peak(image, v) for v in moved_voxels])
    assert np.linalg.norm(found - moved_voxels, axis=-1).max() < 0.5


def test_absent_landmarks_stay_nan_and_intensity_changes_apply():
    ranges = SubjectRanges()
    affine = grid_affine()
    voxels = landmark_voxels()
    volume = blob_volume(voxels) + 10.0
    world = voxels @ affine[:3, :3].T + affine[:3, 3]
    world[2] = np.nan
    image, moved = make_subject(volume, affine, world, sample_subject(np.random.default_rng(5), ranges), ranges)
    assert np.isnan(moved[2]).all() and np.isfinite(np.delete(moved, 2, axis=0)).all()
    assert np.isfinite(image).all() and (image >= 0).all()  # Rician noise: magnitudes


def test_sampling_is_deterministic_and_within_the_ranges():
    ranges = SubjectRanges()
    a, b = (sample_subject(np.random.default_rng([3, 1, 4]), ranges) for _ in range(2))
    assert a == b
    assert a != sample_subject(np.random.default_rng([3, 1, 5]), ranges)
    subjects = [sample_subject(np.random.default_rng(i), ranges) for i in range(50)]
    assert max(max(abs(r) for r in s.rotate_rad) for s in subjects) <= np.deg2rad(ranges.rotate_deg)
    assert all(abs(s.scale - 1) <= ranges.scale and max(map(abs, s.translate_mm)) <= 10 for s in subjects)
    assert all(np.exp(-ranges.log_gamma) <= s.gamma <= np.exp(ranges.log_gamma) for s in subjects)


def test_same_subject_same_image():
    ranges = SubjectRanges()
    affine = grid_affine()
    voxels = landmark_voxels()
    world = voxels @ affine[:3, :3].T + affine[:3, 3]
    subject = sample_subject(np.random.default_rng(9), ranges)
    first, second = (make_subject(blob_volume(voxels), affine, world, subject, ranges) for _ in range(2))
    assert np.array_equal(first[0], second[0]) and np.array_equal(first[1], second[1])
