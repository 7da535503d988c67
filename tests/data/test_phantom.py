"""Tests of the synthetic head phantom: files, exact intensities on disk, determinism (across runs, chunk
sizes and worker counts), stratified splits, geometry, landmarks on the anatomy, absence and left/right
symmetry."""

from __future__ import annotations

import dataclasses
import json
import math

import nibabel as nib
import numpy as np
import pytest
import torch

from h3de.cli import main
from h3de.data import phantom
from h3de.data.landmark_io import read_landmarks
from h3de.data.manifest import SPLITS, load_manifest
from h3de.data.phantom import PHANTOM_LANDMARKS, PHANTOM_MIRRORED_PAIRS, generate_phantom

SEED, NUM_CASES, VOXEL_MM = 0, 20, 4.0
TEETH = ("tooth_L", "tooth_R")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """20 cases at 4 mm, generated once for the module."""
    return generate_phantom(tmp_path_factory.mktemp("phantom"), seed=SEED, num_cases=NUM_CASES, voxel_mm=VOXEL_MM)


def _load(case) -> tuple[np.ndarray, np.ndarray]:
    image = nib.load(case.image)
    return np.asarray(image.dataobj), image.affine


def _voxel_to_world(index: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """(N, 3) world mm of (N, 3) voxel indices."""
    return index @ affine[:3, :3].T + affine[:3, 3]


def _world_to_canonical(spec, world: np.ndarray) -> np.ndarray:
    """(N, 3) canonical mm of (N, 3) world RAS mm, point by point: ``q = R^T (x - t)``, ``p = q + d(q)``."""
    q = (world - spec.translation) @ spec.rotation
    return q + phantom._displacement(spec.warp, q)


def _peak_near(image: np.ndarray, affine: np.ndarray, point: np.ndarray, radius: float) -> float:
    """Largest intensity among the voxels whose centres lie within ``radius`` mm of world ``point``."""
    centre = np.linalg.solve(affine, np.append(point, 1.0))[:3]
    reach = radius / np.linalg.norm(affine[:3, :3], axis=0)
    lo = np.clip(np.floor(centre - reach), 0, None).astype(int)
    hi = np.clip(np.ceil(centre + reach), None, np.array(image.shape) - 1).astype(int)
    index = np.indices(hi - lo + 1).reshape(3, -1).T + lo
    near = np.linalg.norm(_voxel_to_world(index, affine) - point, axis=1) <= radius
    assert near.any()
    return float(image[tuple(index[near].T)].max())


def test_dataset_files_and_manifest(dataset):
    manifest = load_manifest(dataset.path)
    assert manifest.name == "phantom"
    assert manifest.landmark_names == PHANTOM_LANDMARKS
    assert manifest.mirrored_pairs == PHANTOM_MIRRORED_PAIRS
    assert len(PHANTOM_LANDMARKS) == len(set(PHANTOM_LANDMARKS))
    assert [c.id for c in manifest.cases] == [f"case_{i:03d}" for i in range(NUM_CASES)]
    assert [len(manifest.split(s)) for s in SPLITS] == [14, 3, 3]
    assert [c.split for c in manifest.cases] == phantom._plan_splits(SEED, NUM_CASES, (0.7, 0.15, 0.15))
    generator = json.loads(dataset.path.read_text())["generator"]
    assert generator == {
        "seed": SEED,
        "num_cases": NUM_CASES,
        "voxel_mm": VOXEL_MM,
        "split_fractions": [0.7, 0.15, 0.15],
        "version": phantom._GENERATOR_VERSION,
    }
    for case in manifest.cases:
        image = nib.load(case.image)
        assert image.get_data_dtype() == np.int16
        assert image.dataobj.slope == 1 / 1024 and image.dataobj.inter == 0
        assert int(image.header["qform_code"]) == int(image.header["sform_code"]) == 1
        np.testing.assert_allclose(image.get_qform(), image.affine, atol=1e-4)
        names, _ = read_landmarks(case.landmarks)
        assert names == list(PHANTOM_LANDMARKS)
        assert manifest.read_case_landmarks(case).shape == (len(PHANTOM_LANDMARKS), 3)
    assert not list(dataset.path.parent.rglob(".*.tmp*")), "temporary files left behind"


def test_stored_intensities_are_the_rendered_floats_exactly(dataset):
    from h3de.data.pipelines import LoadVolumed

    for index in (0, 1):
        rendered = phantom._render_image(phantom._sample_case(SEED, index, VOXEL_MM))
        case = dataset.cases[index]
        by_nibabel = np.asarray(nib.load(case.image).dataobj)
        np.testing.assert_array_equal(by_nibabel, rendered)
        by_loader = LoadVolumed()({"image": str(case.image)})["image"]  # what training and evaluation read
        assert by_loader.dtype == torch.float32 and by_loader.shape == (1, *rendered.shape)
        np.testing.assert_array_equal(by_loader[0].numpy(), rendered)
        assert np.ptp(rendered) > 1.0 and len(np.unique(rendered)) > 100


def test_rendering_in_blocks_matches_rendering_points():
    """The image path renders only voxel blocks that layers reach; point by point it must agree."""
    spec = dataclasses.replace(phantom._sample_case(SEED, 2, 5.0), scale=1.0, bias_amplitude=0.0, noise_sd=0.0)
    image = phantom._render_image(spec, chunk_voxels=3000)
    world = _voxel_to_world(np.indices(spec.shape).reshape(3, -1).T, spec.affine)
    tissue = phantom._render_canonical(spec.anatomy, _world_to_canonical(spec, world)).reshape(spec.shape)
    np.testing.assert_allclose(image, tissue, rtol=0, atol=0.5 / 1024 + 1e-6)
    assert (tissue == 0).mean() > 0.3 and tissue.max() > 1.0  # air around the head, and bone and teeth


def test_voxel_blocks_hold_every_voxel_a_layer_reaches():
    spec = phantom._sample_case(SEED, 4, 2.0)  # fine voxels: a block a few voxels short would miss some
    index = np.indices(spec.shape).reshape(3, -1).T
    p = _world_to_canonical(spec, _voxel_to_world(index, spec.affine))
    block, bias = phantom._block_positions(spec, np.zeros(3, int), np.array(spec.shape))
    np.testing.assert_allclose(np.stack([c.ravel() for c in block], axis=1), p, atol=1e-4)
    assert bias.shape == spec.shape and 0.79 < bias.min() < bias.max() < 1.21
    reach = phantom._REACH_MM
    for (lo, hi), _, _ in phantom._layers(spec.anatomy):
        first, last = phantom._voxel_box(spec, lo - reach, hi + reach)
        near = np.all((p >= lo - reach) & (p <= hi + reach), axis=1)  # the voxels the layer may change
        in_block = np.all((index >= first) & (index < last), axis=1)
        assert near.any() and not (near & ~in_block).any()


def test_rendering_does_not_depend_on_the_chunk_size():
    spec = phantom._sample_case(SEED, 1, 6.0)
    whole = phantom._render_image(spec, chunk_voxels=spec.shape[0] * spec.shape[1] * spec.shape[2])
    for chunk in (1, 5000):  # one slice at a time; a few slices, the last slab shorter
        np.testing.assert_array_equal(phantom._render_image(spec, chunk_voxels=chunk), whole)
    quanta = whole * 1024
    np.testing.assert_array_equal(quanta, np.round(quanta))


@pytest.mark.parametrize(
    ("num_cases", "fractions", "counts"),
    [
        (3, (0.7, 0.15, 0.15), [1, 1, 1]),
        (4, (0.1, 0.45, 0.45), [1, 2, 1]),
        (40, (0.7, 0.15, 0.15), [28, 6, 6]),
    ],
)
def test_every_split_gets_a_case(num_cases, fractions, counts):
    assert list(phantom._split_counts(num_cases, fractions)) == counts
    splits = phantom._assign_splits([False] * num_cases, fractions)  # one stratum: cases in order
    assert [splits.count(s) for s in SPLITS] == counts
    assert splits == sorted(splits, key=SPLITS.index)


@pytest.mark.parametrize("seed", range(5))
def test_every_split_of_the_default_dataset_has_missing_teeth(seed):
    fractions = (0.7, 0.15, 0.15)
    splits = phantom._plan_splits(seed, 40, fractions)
    assert splits == phantom._plan_splits(seed, 40, fractions)
    absent = [not all(phantom._sample_anatomy(np.random.default_rng([seed, i])).canines) for i in range(40)]
    assert [splits.count(s) for s in SPLITS] == [28, 6, 6]
    per_split = {s: sum(a for a, split in zip(absent, splits, strict=True) if split == s) for s in SPLITS}
    assert all(n >= 1 for n in per_split.values()), per_split
    assert per_split["train"] >= max(per_split["val"], per_split["test"])  # shared out in proportion
    if seed == 0:  # the fast path draws the anatomy that is rendered
        index = absent.index(True)
        assert not all(phantom._sample_case(seed, index, 8.0).anatomy.canines)
        assert per_split == {"train": 5, "val": 1, "test": 1}


@pytest.mark.parametrize(
    ("absent", "fractions", "expected"),
    [
        ("AAAA" + "C" * 16, (0.5, 0.25, 0.25), "ttvs" + "t" * 8 + "v" * 4 + "s" * 4),  # in proportion, in order
        ("AACCC", (0.4, 0.4, 0.2), "tvtvs"),  # two absent: train and val (the 1-case test split is exempt)
        ("ACCCCC", (0.34, 0.33, 0.33), "ttvvss"),  # one absent: train first
        ("CCACC", (0.2, 0.4, 0.4), "tvsvs"),  # the 1-case train split is exempt: test before val
        ("AAAAA", (0.4, 0.4, 0.2), "ttvvs"),  # nothing complete: sizes still hold
        ("AAAAC", (0.4, 0.4, 0.2), "ttvsv"),  # one complete case for two splits of 2: val keeps it
    ],
)
def test_assign_splits_shares_out_the_cases_with_missing_landmarks(absent, fractions, expected):
    names = {"t": "train", "v": "val", "s": "test"}
    assert phantom._assign_splits([c == "A" for c in absent], fractions) == [names[c] for c in expected]


def test_same_seed_same_data_other_seed_other_data(tmp_path):
    def read(out, seed, num_cases=3, workers=1):
        manifest = generate_phantom(out, seed=seed, num_cases=num_cases, voxel_mm=8.0, workers=workers)
        return [(*_load(c), manifest.read_case_landmarks(c), c.split) for c in manifest.cases]

    first, again = read(tmp_path / "a", 7), read(tmp_path / "b", 7, workers=2)  # the same in parallel
    for (image, affine, points, split), (image2, affine2, points2, split2) in zip(first, again, strict=True):
        np.testing.assert_array_equal(image, image2)
        np.testing.assert_array_equal(affine, affine2)
        np.testing.assert_array_equal(points, points2)
        assert split == split2
    longer = read(tmp_path / "c", 7, num_cases=4)  # case i depends only on (seed, i); its split may not
    for (image, _, points, _), (image2, _, points2, _) in zip(first, longer[:3], strict=True):
        np.testing.assert_array_equal(image, image2)
        np.testing.assert_array_equal(points, points2)
    other = read(tmp_path / "d", 8)
    for (image, affine, points, _), (image2, affine2, points2, _) in zip(first, other, strict=True):
        assert image.shape != image2.shape or not np.array_equal(image, image2)
        assert not np.allclose(affine, affine2)
        assert not np.allclose(np.nan_to_num(points), np.nan_to_num(points2))


def test_geometry_varies_across_cases(dataset):
    codes, in_plane, origins = set(), [], []
    for case in dataset.cases:
        image = nib.load(case.image)
        codes.add("".join(nib.aff2axcodes(image.affine)))
        spacing = np.asarray(image.header.get_zooms()[:3])
        assert spacing[2] == pytest.approx(1.5 * spacing[0], rel=0.25)  # thick slices
        assert spacing[0] == pytest.approx(spacing[1])
        in_plane.append(spacing[0])
        origins.append(image.affine[:3, 3])
        linear = image.affine[:3, :3]
        assert np.count_nonzero(linear) == 3, "axes are permuted and flipped, never oblique"
    assert len(codes) >= 3 and {"RAS", "LPS"} & codes
    assert max(in_plane) - min(in_plane) > 0.2 and all(0.9 * VOXEL_MM <= s <= 1.1 * VOXEL_MM for s in in_plane)
    origins = np.array(origins)
    assert np.all(np.abs(origins) > 20.0)  # the grid is not centred on the world origin
    assert np.unique(origins.round(1), axis=0).shape[0] == len(origins)


def test_head_lies_inside_the_field_of_view():
    for index in range(20):
        spec = phantom._sample_case(3, index, 6.0)
        world = _voxel_to_world(np.indices(spec.shape).reshape(3, -1).T, spec.affine)
        tissue = phantom._render_canonical(spec.anatomy, _world_to_canonical(spec, world))
        tissue = tissue.reshape(spec.shape)
        faces = [tissue[0], tissue[-1], tissue[:, 0], tissue[:, -1], tissue[:, :, 0], tissue[:, :, -1]]
        assert max(f.max() for f in faces) < 0.02, f"case {index}: the head touches the border"
        assert tissue.max() > 1.0


def test_landmarks_inside_the_volume_and_on_visible_tissue(dataset):
    for case in dataset.cases:
        image, affine = _load(case)
        air = _peak_near(image, affine, affine[:3, 3], 10.0)  # around voxel (0, 0, 0), a corner: air
        radius = 1.5 * np.abs(affine[:3, :3]).max()
        for name, point in zip(PHANTOM_LANDMARKS, dataset.read_case_landmarks(case), strict=True):
            if np.isnan(point).any():
                continue
            voxel = np.linalg.solve(affine, np.append(point, 1.0))[:3]
            assert np.all(voxel >= 0) and np.all(voxel <= np.array(image.shape) - 1), (case.id, name)
            peak = _peak_near(image, affine, point, radius)
            assert peak > 0.1 and peak > 1.5 * air, (case.id, name, peak, air)


def test_stored_landmarks_map_back_onto_the_canonical_features(dataset):
    for index, case in enumerate(dataset.cases[:6]):
        spec = phantom._sample_case(SEED, index, VOXEL_MM)
        _, affine = _load(case)
        np.testing.assert_allclose(affine, spec.affine, atol=1e-4)
        stored = dataset.read_case_landmarks(case)
        world = phantom._world_landmarks(spec)
        present = ~np.isnan(stored).any(axis=1)
        np.testing.assert_allclose(stored[present], world[present], atol=1e-9)
        canonical = _world_to_canonical(spec, world)
        np.testing.assert_allclose(canonical, phantom._canonical_landmarks(spec.anatomy), atol=1e-6)


def _probes(anatomy) -> dict[str, list[tuple[np.ndarray, float, float]]]:
    """Per landmark: (offset mm from the landmark, lowest, highest canonical intensity there)."""
    e_w = phantom._jaw_frame(anatomy)[2]
    x, y, z = np.eye(3)
    into_orbit = np.array([-2.0, 2.0, -2.0])  # medial, anterior, inferior of the right orbit's corner
    return {
        "nose_tip": [(-3 * y, 0.35, 0.5), (4 * y, 0.0, 0.02)],
        "vertex": [(-3 * z, 0.8, 1.0), (12 * z, 0.0, 0.02)],
        "inion": [(3 * y, 0.8, 1.0), (-4 * y, 0.0, 0.02)],
        "menton": [(3 * z, 0.9, 1.0), (-12 * z, 0.0, 0.02)],
        "ventricle_junction": [(0 * z, 0.2, 0.3), (8 * z, 0.55, 0.65), (-8 * z, 0.55, 0.65)],
        "orbit_R": [(into_orbit, 0.15, 0.3), (-into_orbit, 0.9, 1.0)],
        "orbit_L": [(phantom._mirror(into_orbit), 0.15, 0.3), (-phantom._mirror(into_orbit), 0.9, 1.0)],
        "ear_R": [(3 * x, 0.0, 0.05), (-3 * x, 0.9, 1.0)],
        "ear_L": [(-3 * x, 0.0, 0.05), (3 * x, 0.9, 1.0)],
        "tooth_R": [(-4 * e_w, 1.1, 1.4), (3 * e_w, 0.4, 0.5)],
        "tooth_L": [(-4 * e_w, 1.1, 1.4), (3 * e_w, 0.4, 0.5)],
    }


@pytest.mark.parametrize("index", [0, 2, 5])
def test_canonical_features_sit_at_the_landmarks(index):
    anatomy = phantom._sample_case(SEED, index, VOXEL_MM).anatomy
    assert all(anatomy.canines)
    landmarks = dict(zip(PHANTOM_LANDMARKS, phantom._canonical_landmarks(anatomy), strict=True))
    for name, probes in _probes(anatomy).items():
        for offset, low, high in probes:
            value = phantom._render_canonical(anatomy, (landmarks[name] + offset)[None])[0]
            assert low <= value <= high, (name, offset, value)


def test_some_cases_miss_canine_teeth(dataset):
    absent_per_case = []
    for index, case in enumerate(dataset.cases):
        points = dataset.read_case_landmarks(case)
        absent = {n for n, p in zip(PHANTOM_LANDMARKS, points, strict=True) if np.isnan(p).any()}
        assert absent <= set(TEETH)
        anatomy = phantom._sample_case(SEED, index, VOXEL_MM).anatomy
        assert absent == {n for n, present in zip(TEETH, anatomy.canines, strict=True) if not present}
        absent_per_case.append(len(absent))
    assert 0 < sum(n > 0 for n in absent_per_case) < NUM_CASES // 2


def test_a_missing_canine_is_missing_from_the_image():
    index = next(i for i in range(40) if sum(phantom._sample_case(SEED, i, 2.0).anatomy.canines) == 1)
    spec = phantom._sample_case(SEED, index, 2.0)  # fine voxels, so the tooth tips are resolved
    image = phantom._render_image(spec)
    where = dict(zip(PHANTOM_LANDMARKS, phantom._world_landmarks(spec), strict=True))
    present, absent = (name for _, name in sorted(zip(spec.anatomy.canines, TEETH, strict=True), reverse=True))
    present_peak = _peak_near(image, spec.affine, where[present], 3.0)
    absent_peak = _peak_near(image, spec.affine, where[absent], 3.0)
    assert np.isnan(phantom._case_landmarks(spec)[PHANTOM_LANDMARKS.index(absent)]).all()
    assert present_peak > 1.5 * absent_peak
    gums = spec.scale * 1.2 * phantom._SOFT + 4 * spec.noise_sd  # brightest soft tissue the bias allows
    assert absent_peak < gums < present_peak


def test_canonical_anatomy_is_mirror_symmetric():
    anatomy = phantom._sample_case(SEED, 0, VOXEL_MM).anatomy
    assert all(anatomy.canines)
    rng = np.random.default_rng(0)
    landmarks = phantom._canonical_landmarks(anatomy)
    right = [landmarks[PHANTOM_LANDMARKS.index(r)] for _, r in PHANTOM_MIRRORED_PAIRS]
    for left_name, right_name in PHANTOM_MIRRORED_PAIRS:
        left_point, right_point = (landmarks[PHANTOM_LANDMARKS.index(n)] for n in (left_name, right_name))
        assert left_point[0] < 0 < right_point[0]
        np.testing.assert_array_equal(left_point, phantom._mirror(right_point))
    near_pairs = np.concatenate([c + rng.uniform(-15, 15, (2000, 3)) for c in right])
    everywhere = rng.uniform(-130, 130, (20000, 3))
    points = np.concatenate([near_pairs, everywhere])
    values = phantom._render_canonical(anatomy, points)
    mirrored = phantom._render_canonical(anatomy, phantom._mirror(points))
    np.testing.assert_allclose(values, mirrored, atol=1e-5)
    assert np.ptp(values[: len(near_pairs)]) > 1.0  # the probes do see structure


def test_manifest_is_written_only_after_every_case(tmp_path, monkeypatch):
    generate_phantom(tmp_path, num_cases=3, voxel_mm=10.0)
    assert (tmp_path / "dataset.json").is_file()
    save = phantom._save_image
    calls = []

    def failing_save(path, image, affine):
        calls.append(path)
        if len(calls) == 2:
            raise OSError("disk full")
        save(path, image, affine)

    monkeypatch.setattr(phantom, "_save_image", failing_save)
    with pytest.raises(OSError, match="disk full"):
        generate_phantom(tmp_path, num_cases=3, voxel_mm=10.0)
    assert not (tmp_path / "dataset.json").exists()


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"num_cases": 2}, "num_cases"),
        ({"num_cases": 3.5}, "num_cases"),
        ({"voxel_mm": 0.0}, "voxel_mm"),
        ({"voxel_mm": -2.0}, "voxel_mm"),
        ({"voxel_mm": math.nan}, "voxel_mm"),
        ({"seed": -1}, "seed"),
        ({"split_fractions": (0.5, 0.5)}, "split_fractions"),
        ({"split_fractions": (0.8, 0.3, -0.1)}, "split_fractions"),
        ({"split_fractions": (0.5, 0.3, 0.3)}, "split_fractions"),
        ({"workers": 0}, "workers"),
        ({"workers": 2.0}, "workers"),
    ],
)
def test_bad_arguments_raise_value_error_naming_the_value(tmp_path, kwargs, named):
    value = next(iter(kwargs.values()))
    with pytest.raises(ValueError, match=named) as error:
        generate_phantom(tmp_path, **kwargs)
    assert repr(value) in str(error.value)
    assert not any(tmp_path.iterdir())


def test_cli_passes_workers_on(tmp_path, capsys):
    assert main(["data", "phantom", "--out", str(tmp_path), "--cases", "3", "--voxel-mm", "10", "--workers", "0"]) == 2
    assert "workers must be a positive integer, got 0" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())
