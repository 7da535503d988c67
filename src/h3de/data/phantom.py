"""Synthetic head phantom: the built-in default dataset.

Every case is a CT-like head volume with 11 landmarks at geometric features (cone apices, box corners,
cylinder ends, the junction of two tubes). The anatomy is defined in a canonical subject frame (mm,
RAS: +x Right, +y Anterior, +z Superior, head centre at the origin) and is bilaterally symmetric, so
the two landmarks of a mirrored pair look identical up to the flip and only global context tells left
(negative x) from right.

Per case, all drawn from ``numpy.random.default_rng([seed, index])``:

- anatomy: size and position jitter of every structure (a few mm or %, kept symmetric);
  in about 20 % of cases one or both canine teeth are missing from the image and their landmarks
  are NaN.
- warp: a smooth displacement ``d`` (three sinusoids, <= 4.8 mm, wavelength >= 120 mm) so that the
  tissue at grid position ``q`` is the canonical tissue at ``q + d(q)``.
- pose: rotation (+-10 deg about each axis) and translation (+-10 mm) into world space.
- geometry: anisotropic voxels (in-plane ``voxel_mm`` +-10 %, slices 1.5x thicker), a 240 mm field of
  view placed at a random offset around the head, and one of eight storage orientations (RAS, LPS,
  axial, coronal and sagittal permutations).
- intensity: global scale (x0.7-1.4), a smooth multiplicative bias field (0.8-1.2) and Gaussian noise
  (sd 0.01-0.03), stored exactly as int16 multiples of 1/1024 (NIfTI ``scl_slope``).

Splits follow the configured fractions, stratified by missing teeth: every split of >= 2 cases holds a
case with missing teeth when there are enough of them.

A voxel's intensity is rendered at its world position ``x = affine @ [i, j, k, 1]``:
``q = R^T (x - t)``, ``p = q + d(q)``, ``image = scale * bias(x) * tissue(p) + noise``. A canonical
landmark ``c`` is stored at ``R q + t`` with ``q + d(q) = c``, so landmarks sit exactly on the
rendered features. Tissue is point-sampled with soft (~1 mm) edges, so at coarse spacings thin tips
(nose, teeth) may fall between voxel centres.
"""

from __future__ import annotations

import functools
import math
import multiprocessing
import numbers
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from h3de.data.landmark_io import write_landmarks
from h3de.data.manifest import SPLITS, Case, Manifest, load_manifest, write_manifest
from h3de.errors import DataError
from h3de.io_utils import atomic_path, removed_if_left_empty

__all__ = ["generate_phantom", "PHANTOM_LANDMARKS", "PHANTOM_MIRRORED_PAIRS"]

PHANTOM_LANDMARKS = (
    "nose_tip",
    "vertex",
    "inion",
    "menton",
    "ventricle_junction",
    "orbit_L",
    "orbit_R",
    "ear_L",
    "ear_R",
    "tooth_L",
    "tooth_R",
)
PHANTOM_MIRRORED_PAIRS = (("orbit_L", "orbit_R"), ("ear_L", "ear_R"), ("tooth_L", "tooth_R"))

_GENERATOR_VERSION = 2  # 2: splits stratified by missing teeth; int16 storage (same values)
_ABSENT_PROBABILITY = 0.2
_FOV_MM = 240.0  # voxel centres span at least this along every axis
_QUANTUM = 1 / 1024  # intensities are int16 multiples of this on disk, like a scanner's integers
_SLICE_FACTOR = 1.5
_EDGE_MM = 0.75  # sigmoid scale of the soft tissue boundaries
_REACH_MM = 12.0  # beyond this distance from its bounding box a layer changes nothing
_CHUNK_VOXELS = 1 << 18  # voxels rendered at a time (whole slices): bounds memory, never changes the image
_ORIENTATIONS = ("RAS", "LPS", "LAS", "RPI", "LSA", "PSR", "ASL", "IRP")
_AXIS_OF_LETTER = {
    "R": (0, 1.0),
    "L": (0, -1.0),
    "A": (1, 1.0),
    "P": (1, -1.0),
    "S": (2, 1.0),
    "I": (2, -1.0),
}

# Tissue intensities before scale, bias and noise.
_AIR, _FAT, _CSF, _SOFT, _BRAIN, _BONE, _ENAMEL = 0.0, 0.2, 0.25, 0.45, 0.6, 1.0, 1.4

# Teeth on each side of the jaw arch: (angle from the midline in deg, base radius mm, height above
# the jaw's tube centre mm); the canine is the third and its angle is jittered per case.
_INCISORS = ((9.0, 3.0, 11.0), (25.0, 3.0, 11.0))
_PREMOLARS = ((60.0, 3.5, 11.0), (76.0, 3.5, 11.0))
_CANINE_RADIUS, _CANINE_HEIGHT, _TOOTH_ROOT = 4.0, 15.0, 2.0
_GUM_LIFT, _GUM_THICKEN = 5.0, 9.0  # soft tissue around the jaw covers the teeth

_SignedDistance = Callable[[np.ndarray], np.ndarray]  # (M, 3) float32 points -> (M,) mm, negative inside
_Cone = tuple[np.ndarray, np.ndarray, float]  # apex (3,), base centre (3,), base radius; mm


@dataclass(frozen=True)
class _Anatomy:
    """Canonical anatomy of one case (mm, subject frame). Paired structures are given on the right."""

    skull_centre: np.ndarray  # (3,), x = 0
    skull_radii: np.ndarray  # (3,) outer radii of the skull ellipsoid
    skull_thickness: float
    skin_thickness: float
    ventricle_junction: np.ndarray  # (3,), x = 0: where the two ventricle tubes cross
    nose_apex: np.ndarray  # (3,), x = 0
    nose_length: float
    nose_radius: float
    inion_apex: np.ndarray  # (3,), x = 0
    inion_length: float
    inion_radius: float
    orbit_centre: np.ndarray  # (3,) right orbit cavity, x > 0
    orbit_half: np.ndarray  # (3,) half sizes of the orbit cavity
    ear_end: np.ndarray  # (3,) inner end of the right ear canal, x > 0
    jaw_centre: np.ndarray  # (3,), x = 0: centre of the half-torus jaw arch
    jaw_radius: float  # arch radius
    jaw_tube: float  # tube radius
    jaw_tilt: float  # rad, the front of the arch tilts down
    canine_angle: float  # rad from the midline
    canines: tuple[bool, bool]  # (left, right) present
    vertex_apex: np.ndarray  # (3,), x = 0: tip of the bony crest on top of the skull
    vertex_length: float
    vertex_radius: float


@dataclass(frozen=True)
class _Warp:
    """Smooth displacement ``d(q) = sum_k amplitude_k * sin(wavevector_k . q + phase_k)``."""

    amplitudes: np.ndarray  # (K, 3) mm
    wavevectors: np.ndarray  # (K, 3) rad/mm
    phases: np.ndarray  # (K,) rad


@dataclass(frozen=True)
class _CaseSpec:
    """Everything random about one case; rendering it is deterministic."""

    anatomy: _Anatomy
    warp: _Warp
    rotation: np.ndarray  # (3, 3) subject -> world
    translation: np.ndarray  # (3,) mm
    affine: np.ndarray  # (4, 4) voxel -> world (RAS mm)
    shape: tuple[int, int, int]
    scale: float
    bias_amplitude: float
    bias_wavevector: np.ndarray  # (3,) rad/mm
    bias_phase: float
    noise_sd: float
    noise_seed: int


def generate_phantom(
    out_dir: str | os.PathLike,
    seed: int = 0,
    num_cases: int = 40,
    voxel_mm: float = 3.0,
    split_fractions: Sequence[float] = (0.7, 0.15, 0.15),
    workers: int = 1,
) -> Manifest:
    """Generate the phantom dataset and its manifest.

    Writes ``images/case_<index>.nii.gz`` (int16 with ``scl_slope`` 1/1024: readers get the float
    intensities back exactly), ``landmarks/case_<index>.mrk.json`` (RAS world mm, absent landmarks
    "missing") and, last, ``dataset.json``; an existing ``dataset.json`` is removed first, so one exists
    only when every case is written. The image and landmarks of case ``i`` depend only on ``(seed, i)``
    and ``voxel_mm``, never on ``workers``; the splits only on ``(seed, num_cases, split_fractions)``.

    Cost: at 1 mm a case has about 262 x 262 x 157 voxels and takes about 2.3 s of CPU (rendering in
    slabs, about 0.2 GB of memory per process, then gzip) and 10.4 MB; ``h3de data phantom --out DIR
    --voxel-mm 1.0 --workers 2`` wrote the 40 default cases (415 MB) with 93 s of CPU, in 4 min 49 s
    on 2 cores shared with other jobs (under a minute of CPU per core). The default 3 mm takes about
    0.15 s and 0.4 MB a case.

    Args:
        out_dir: output folder, created if needed.
        seed: non-negative random seed.
        num_cases: number of cases, >= 3 so every split gets one.
        voxel_mm: in-plane voxel spacing in mm (jittered +-10 % per case; slices are 1.5x thicker).
        split_fractions: positive (train, val, test) fractions summing to 1; every split gets at least
            one case, and every split of >= 2 cases at least one with missing teeth and one without,
            as far as the cases allow (train first, then test, then val).
        workers: number of processes rendering cases in parallel (1: in this process).

    Returns:
        The manifest as loaded back from ``dataset.json``.

    Raises:
        ValueError: naming the invalid argument.
        DataError: an output folder that cannot be made (a file in the way). A folder that an error left empty is
            removed.
    """
    fractions = _check_arguments(seed, num_cases, voxel_mm, split_fractions, workers)
    out = Path(out_dir).resolve()
    with removed_if_left_empty(out):
        _make_folder(out)
        return _generate(out, seed, num_cases, voxel_mm, fractions, workers)


def _make_folder(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"{out}: cannot make the output folder there ({e.strerror or e})") from None


def _generate(out: Path, seed: int, num_cases: int, voxel_mm: float, fractions: tuple, workers: int) -> Manifest:
    manifest_path = out / "dataset.json"
    manifest_path.unlink(missing_ok=True)
    splits = _plan_splits(seed, num_cases, fractions)
    write = functools.partial(_write_case, out, seed, voxel_mm=voxel_mm)
    if workers == 1:
        written = [write(index) for index in range(num_cases)]
    else:
        context = multiprocessing.get_context("spawn")  # no fork: the caller may hold threads (torch)
        with ProcessPoolExecutor(min(workers, num_cases), mp_context=context) as pool:
            written = list(pool.map(write, range(num_cases)))
    cases = [Case(*files, split) for files, split in zip(written, splits, strict=True)]
    generator = {
        "seed": int(seed),
        "num_cases": int(num_cases),
        "voxel_mm": float(voxel_mm),
        "split_fractions": list(fractions),
        "version": _GENERATOR_VERSION,
    }
    manifest = Manifest(
        path=manifest_path,
        name="phantom",
        landmark_names=PHANTOM_LANDMARKS,
        mirrored_pairs=PHANTOM_MIRRORED_PAIRS,
        cases=tuple(cases),
        description="Synthetic CT-like head phantom generated by h3de.data.phantom",
        extra={"generator": generator},
    )
    write_manifest(manifest_path, manifest)
    return load_manifest(manifest_path)


def _write_case(out: Path, seed: int, index: int, voxel_mm: float) -> tuple[str, Path, Path]:
    """Render case ``index`` and write its image and landmarks; return (case id, image path, landmark path)."""
    case_id = f"case_{index:03d}"
    spec = _sample_case(seed, index, voxel_mm)
    image_path, landmark_path = out / "images" / f"{case_id}.nii.gz", out / "landmarks" / f"{case_id}.mrk.json"
    _save_image(image_path, _render_image(spec), spec.affine)
    write_landmarks(landmark_path, list(PHANTOM_LANDMARKS), _case_landmarks(spec))
    return case_id, image_path, landmark_path


def _check_arguments(seed, num_cases, voxel_mm, split_fractions, workers) -> tuple[float, float, float]:
    """Validate ``generate_phantom``'s arguments; return the split fractions as floats."""
    if not _is_integer(seed) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if not _is_integer(num_cases) or num_cases < 3:
        raise ValueError(f"num_cases must be an integer >= 3 so every split gets a case, got {num_cases!r}")
    if not _is_real(voxel_mm) or voxel_mm <= 0:
        raise ValueError(f"voxel_mm must be a positive number of mm, got {voxel_mm!r}")
    if not _is_integer(workers) or workers < 1:
        raise ValueError(f"workers must be a positive integer, got {workers!r}")
    fractions = tuple(split_fractions)
    if (
        len(fractions) != len(SPLITS)
        or not all(_is_real(f) and f > 0 for f in fractions)
        or abs(sum(fractions) - 1.0) > 1e-6
    ):
        raise ValueError(
            f"split_fractions must be {len(SPLITS)} positive fractions {SPLITS} summing to 1, got {split_fractions!r}"
        )
    return tuple(float(f) for f in fractions)


def _is_integer(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _plan_splits(seed: int, num_cases: int, fractions: tuple[float, float, float]) -> list[str]:
    """Split name of every case, from the cases' missing teeth alone (nothing is rendered)."""
    absent = [not all(_sample_anatomy(np.random.default_rng([seed, i])).canines) for i in range(num_cases)]
    return _assign_splits(absent, fractions)


def _split_counts(num_cases: int, fractions: tuple[float, float, float]) -> np.ndarray:
    """(3,) int cases per split: nearest ``num_cases * fractions``, each >= 1."""
    ideal = np.asarray(fractions) * num_cases
    counts = np.maximum(np.floor(ideal), 1).astype(int)
    while counts.sum() < num_cases:
        counts[np.argmax(ideal - counts)] += 1
    while counts.sum() > num_cases:
        over = np.where(counts > 1, counts - ideal, -np.inf)
        counts[np.argmax(over)] -= 1
    return counts


def _assign_splits(absent: Sequence[bool], fractions: tuple[float, float, float]) -> list[str]:
    """Split name of every case, stratified by whether the case misses a landmark.

    Split sizes are :func:`_split_counts`. The cases missing landmarks are shared out in proportion to
    the split sizes, except that every split of >= 2 cases gets at least one of them and keeps at least
    one complete case, as far as the cases allow (train first, then test, then val). Within each
    stratum cases go to train, val, test in index order, so the result follows from the seed.

    Args:
        absent: per case, whether it misses a landmark.
        fractions: (train, val, test) fractions summing to 1.

    Returns:
        One split name per case, in case order.
    """
    counts = _split_counts(len(absent), fractions)
    num_absent = int(sum(absent))
    quota = np.zeros(len(SPLITS), dtype=int)  # absent cases per split
    for s in (SPLITS.index(name) for name in ("train", "test", "val")):
        if counts[s] >= 2 and quota.sum() < num_absent:
            quota[s] = 1
    ideal = num_absent * counts / counts.sum()
    keep_complete = np.where(counts >= 2, 1, 0)
    while quota.sum() < num_absent:
        room = quota < counts - keep_complete
        if not room.any():  # too few complete cases to keep one in every split
            room = quota < counts
        quota[np.argmax(np.where(room, ideal - quota, -np.inf))] += 1
    queues = {True: [s for s, n in enumerate(quota) for _ in range(n)]}
    queues[False] = [s for s, n in enumerate(counts - quota) for _ in range(n)]
    return [SPLITS[queues[bool(a)].pop(0)] for a in absent]


# ----------------------------------------------------------------------------- sampling a case


def _sample_case(seed: int, index: int, voxel_mm: float) -> _CaseSpec:
    """Draw every random quantity of case ``index`` from ``default_rng([seed, index])``."""
    rng = np.random.default_rng([seed, index])
    anatomy = _sample_anatomy(rng)
    warp = _sample_warp(rng)
    angles = np.deg2rad(rng.uniform(-10.0, 10.0, 3))
    rotation = _rotation_matrix(angles)
    translation = rng.uniform(-10.0, 10.0, 3)
    in_plane = voxel_mm * rng.uniform(0.9, 1.1)
    spacing = np.array([in_plane, in_plane, _SLICE_FACTOR * voxel_mm * rng.uniform(0.9, 1.1)])
    code = _ORIENTATIONS[rng.integers(len(_ORIENTATIONS))]
    lo, hi = _head_bounds(anatomy, warp, rotation, translation)
    affine, shape = _place_grid(rng, lo, hi, spacing, code)
    return _CaseSpec(
        anatomy=anatomy,
        warp=warp,
        rotation=rotation,
        translation=translation,
        affine=affine,
        shape=shape,
        scale=float(rng.uniform(0.7, 1.4)),
        bias_amplitude=float(rng.uniform(0.1, 0.2)),
        bias_wavevector=_random_direction(rng) * 2 * math.pi / rng.uniform(300.0, 500.0),
        bias_phase=float(rng.uniform(0, 2 * math.pi)),
        noise_sd=float(rng.uniform(0.01, 0.03)),
        noise_seed=int(rng.integers(2**31)),
    )


def _sample_anatomy(rng: np.random.Generator) -> _Anatomy:
    """Draw the skull's size and position, then every other structure relative to the skull."""

    def jitter(mm: float) -> float:
        return float(rng.uniform(-mm, mm))

    centre = np.array([0.0, jitter(3.0), jitter(3.0)])
    radii = np.array([70.0, 90.0, 80.0]) * rng.uniform(0.96, 1.04, 3)
    skin = float(rng.uniform(3.0, 5.0))
    nose_length = float(rng.uniform(20.0, 24.0))  # the outer 10-14 mm stick out of the face

    def at(x: float, y: float, z: float) -> np.ndarray:
        return centre + np.array([x, y, z])

    if rng.random() < _ABSENT_PROBABILITY:
        missing = rng.integers(3)  # 0: left, 1: right, 2: both
        canines = (bool(missing == 1), bool(missing == 0))
    else:
        canines = (True, True)
    return _Anatomy(
        skull_centre=centre,
        skull_radii=radii,
        skull_thickness=float(rng.uniform(6.0, 8.0)),
        skin_thickness=skin,
        ventricle_junction=at(0.0, -5.0 + jitter(3.0), 15.0 + jitter(3.0)),
        nose_apex=at(0.0, radii[1] + skin + nose_length - 10.0, -12.0 + jitter(3.0)),
        nose_length=nose_length,
        nose_radius=float(rng.uniform(13.0, 15.0)),
        inion_apex=at(0.0, -radii[1] - rng.uniform(8.0, 11.0), -22.0 + jitter(3.0)),
        inion_length=float(rng.uniform(18.0, 22.0)),
        inion_radius=float(rng.uniform(12.0, 14.0)),
        orbit_centre=at(30.0 + jitter(3.0), 0.78 * radii[1] + jitter(3.0), 14.0 + jitter(3.0)),
        orbit_half=np.array([12.0, 13.0, 10.0]) * rng.uniform(0.9, 1.1, 3),
        ear_end=at(0.77 * radii[0] + jitter(3.0), jitter(3.0), -18.0 + jitter(3.0)),
        jaw_centre=at(0.0, 18.0 + jitter(3.0), -radii[2] + jitter(3.0)),
        jaw_radius=float(40.0 * rng.uniform(0.95, 1.05)),
        jaw_tube=float(rng.uniform(6.5, 7.5)),
        jaw_tilt=math.radians(rng.uniform(9.0, 15.0)),
        canine_angle=math.radians(rng.uniform(39.0, 45.0)),
        canines=canines,
        vertex_apex=at(0.0, -8.0 + jitter(3.0), radii[2] + rng.uniform(9.0, 12.0)),
        vertex_length=float(rng.uniform(18.0, 22.0)),
        vertex_radius=float(rng.uniform(10.0, 12.0)),
    )


def _sample_warp(rng: np.random.Generator, components: int = 3) -> _Warp:
    """Amplitudes 0.8-1.6 mm and wavelengths 120-200 mm per component: |d| <= 4.8 mm, |grad d| < 0.26."""
    amplitudes = np.stack([_random_direction(rng) * rng.uniform(0.8, 1.6) for _ in range(components)])
    wavevectors = np.stack(
        [_random_direction(rng) * 2 * math.pi / rng.uniform(120.0, 200.0) for _ in range(components)]
    )
    return _Warp(amplitudes, wavevectors, rng.uniform(0, 2 * math.pi, components))


def _random_direction(rng: np.random.Generator) -> np.ndarray:
    vector = rng.normal(size=3)
    return vector / np.linalg.norm(vector)


def _rotation_matrix(angles: np.ndarray) -> np.ndarray:
    """(3, 3) rotation ``Rz @ Ry @ Rx`` for angles (rad) about x, y, z."""
    (cx, cy, cz), (sx, sy, sz) = np.cos(angles), np.sin(angles)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def _head_bounds(
    anatomy: _Anatomy, warp: _Warp, rotation: np.ndarray, translation: np.ndarray, step: float = 6.0
) -> tuple[np.ndarray, np.ndarray]:
    """World (RAS mm) bounding box ``(lo, hi)``, each (3,), of the posed, warped head plus a margin.

    The head is found on a ``step`` mm canonical grid; the margin covers the grid's gaps and soft edges.
    """
    axis = np.arange(-132.0, 132.0 + step / 2, step)
    grid = np.stack(np.meshgrid(axis, axis, axis, indexing="ij"), axis=-1).reshape(-1, 3)
    inside = grid[_render_canonical(anatomy, grid) > 0.05]
    world = _dot(_unwarp(warp, inside), rotation.T) + translation
    margin = step * math.sqrt(3) / 2 + 3.0
    return world.min(axis=0) - margin, world.max(axis=0) + margin


def _place_grid(
    rng: np.random.Generator, lo: np.ndarray, hi: np.ndarray, spacing: np.ndarray, code: str
) -> tuple[np.ndarray, tuple[int, int, int]]:
    """Affine (4, 4) and shape of a grid in orientation ``code`` covering [lo, hi] at a random offset.

    Voxel axis ``j`` runs along the world axis of ``code[j]`` (sign from the letter) with spacing
    ``spacing[j]`` mm, and its voxel centres span at least ``_FOV_MM``.
    """
    shape = tuple(math.ceil(_FOV_MM / s) + 1 for s in spacing)
    affine = np.diag([0.0, 0.0, 0.0, 1.0])
    for j, letter in enumerate(code):
        axis, sign = _AXIS_OF_LETTER[letter]
        span = (shape[j] - 1) * spacing[j]
        low = rng.uniform(hi[axis] - span, lo[axis])  # world coordinate of the grid's low end
        assert low <= lo[axis] and low + span >= hi[axis], f"the head does not fit a {_FOV_MM} mm field of view"
        affine[axis, j] = sign * spacing[j]
        affine[axis, 3] = low if sign > 0 else low + span
    return affine, shape


# ----------------------------------------------------------------------------- warp, pose, landmarks


def _dot(points: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """``points @ matrix`` for (N, D) points and a (D,) or (D, M) matrix with small D, written out
    because BLAS threads slow such thin products down many times on a busy machine."""
    return sum(points[:, i, None] * matrix[i] for i in range(len(matrix))).reshape(len(points), *matrix.shape[1:])


def _displacement(warp: _Warp, q: np.ndarray) -> np.ndarray:
    """(N, 3) displacement d(q) in mm at (N, 3) points q."""
    return _dot(np.sin(_dot(q, warp.wavevectors.T) + warp.phases), warp.amplitudes)


def _unwarp(warp: _Warp, c: np.ndarray, iterations: int = 30) -> np.ndarray:
    """Solve ``q + d(q) = c`` for (N, 3) canonical points ``c`` by fixed-point iteration."""
    q = c.copy()
    for _ in range(iterations):
        q = c - _displacement(warp, q)
    residual = np.abs(q + _displacement(warp, q) - c).max(initial=0.0)
    assert residual < 1e-6, f"warp inversion did not converge (residual {residual} mm)"
    return q


def _world_landmarks(spec: _CaseSpec) -> np.ndarray:
    """(L, 3) world RAS mm of every landmark, including where absent ones would be."""
    q = _unwarp(spec.warp, _canonical_landmarks(spec.anatomy))
    return _dot(q, spec.rotation.T) + spec.translation


def _case_landmarks(spec: _CaseSpec) -> np.ndarray:
    """(L, 3) world RAS mm in ``PHANTOM_LANDMARKS`` order; NaN rows for absent landmarks."""
    positions = _world_landmarks(spec)
    for name, present in zip(("tooth_L", "tooth_R"), spec.anatomy.canines, strict=True):
        if not present:
            positions[PHANTOM_LANDMARKS.index(name)] = np.nan
    return positions


def _canonical_landmarks(anatomy: _Anatomy) -> np.ndarray:
    """(L, 3) canonical positions (mm) in ``PHANTOM_LANDMARKS`` order, absent canines included."""
    a = anatomy
    _, e_v, _ = _jaw_frame(a)
    orbit_corner = a.orbit_centre + a.orbit_half * np.array([1.0, -1.0, 1.0])  # lateral, posterior, superior
    canine = _tooth_cones(a)[0][0]
    positions = {
        "nose_tip": a.nose_apex,
        "vertex": a.vertex_apex,
        "inion": a.inion_apex,
        "menton": a.jaw_centre + a.jaw_radius * e_v - np.array([0.0, 0.0, a.jaw_tube]),
        "ventricle_junction": a.ventricle_junction,
        "orbit_L": _mirror(orbit_corner),
        "orbit_R": orbit_corner,
        "ear_L": _mirror(a.ear_end),
        "ear_R": a.ear_end,
        "tooth_L": _mirror(canine),
        "tooth_R": canine,
    }
    return np.stack([np.asarray(positions[name], float) for name in PHANTOM_LANDMARKS])


# ----------------------------------------------------------------------------- rendering


def _render_image(spec: _CaseSpec, chunk_voxels: int = _CHUNK_VOXELS) -> np.ndarray:
    """The case's float32 volume of ``spec.shape``: the tissue at each voxel's world position, scaled,
    biased, noisy and quantised.

    Rendered in slabs of whole slices along the first voxel axis, about ``chunk_voxels`` voxels each, to
    bound memory; within a slab, tissue is computed only in the voxel block that some layer can reach.
    Every voxel's value depends only on the voxel, so the result does not depend on ``chunk_voxels``.
    """
    layers = list(_layers(spec.anatomy))
    boxes = [_voxel_box(spec, lo - _REACH_MM, hi + _REACH_MM) for (lo, hi), _, _ in layers]
    noise = np.random.default_rng(spec.noise_seed)
    image = np.empty(spec.shape, dtype=np.float32)
    slices = spec.shape[1] * spec.shape[2]
    step = max(1, chunk_voxels // slices)
    for start in range(0, spec.shape[0], step):
        stop = min(start + step, spec.shape[0])
        slab = noise.normal(0.0, spec.noise_sd, (stop - start, *spec.shape[1:]))  # (S, J, K)
        clipped = [(np.maximum(a, [start, 0, 0]), np.minimum(b, [stop, *spec.shape[1:]])) for a, b in boxes]
        reached = [(layer, a, b) for layer, (a, b) in zip(layers, clipped, strict=True) if np.all(a < b)]
        if reached:  # render the block [first, last) around every reached layer's voxels
            first = np.min([a for _, a, _ in reached], axis=0)
            last = np.max([b for _, _, b in reached], axis=0)
            p, bias = _block_positions(spec, first, last)
            tissue = np.zeros(last - first, dtype=np.float32)
            for ((lo, hi), signed_distance, intensity), a, b in reached:
                sub = tuple(slice(i, j) for i, j in zip(a - first, b - first, strict=True))
                _paint(tissue[sub], [c[sub] for c in p], lo, hi, signed_distance, intensity)
            block = tuple(slice(i - o, j - o) for i, j, o in zip(first, last, (start, 0, 0), strict=True))
            slab[block] += spec.scale * bias * tissue
        image[start:stop] = np.round(slab / _QUANTUM) * _QUANTUM
    return image


def _voxel_box(spec: _CaseSpec, lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Voxel index block ``[lo, hi)`` (each (3,) int, clipped to the grid) holding every voxel whose
    canonical position ``p`` can lie in the canonical box [lo, hi] (mm)."""
    reach = np.abs(spec.warp.amplitudes).sum(axis=0)  # (3,) bound of |d(q)| per axis, so q is in this box:
    low, high = lo - reach, hi + reach
    corners = np.array([[(low, high)[bit >> c & 1][c] for c in range(3)] for bit in range(8)])  # (8, 3) mm
    linear, offset = _voxel_to_q(spec)
    index = np.linalg.solve(linear, (corners - offset).T).T  # (8, 3) voxel indices of the corners
    first = np.clip(np.floor(index.min(axis=0)) - 1, 0, spec.shape).astype(int)
    last = np.clip(np.ceil(index.max(axis=0)) + 2, 0, spec.shape).astype(int)
    return first, last


def _voxel_to_q(spec: _CaseSpec) -> tuple[np.ndarray, np.ndarray]:
    """(3, 3) matrix and (3,) offset (mm) mapping voxel indices to unwarped canonical ``q = R^T (x - t)``."""
    return spec.rotation.T @ spec.affine[:3, :3], spec.rotation.T @ (spec.affine[:3, 3] - spec.translation)


def _block_positions(spec: _CaseSpec, lo: np.ndarray, hi: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
    """Canonical positions and bias field of the voxel block ``[lo, hi)``.

    Returns:
        ``[px, py, pz]``, each float32 of the block's shape (mm), and the float64 bias field of that shape.
    """
    axes = [np.arange(a, b, dtype=float) for a, b in zip(lo, hi, strict=True)]
    grid = (axes[0][:, None, None], axes[1][None, :, None], axes[2][None, None, :])

    def linear(coefficients: np.ndarray, constant: float) -> np.ndarray:
        """``coefficients . index + constant`` over the block: (I, J, K) float64."""
        return (coefficients[0] * grid[0] + coefficients[1] * grid[1]) + (coefficients[2] * grid[2] + constant)

    matrix, offset = _voxel_to_q(spec)
    p = [linear(matrix[c], offset[c]) for c in range(3)]  # q so far
    warp = spec.warp
    for wave in range(len(warp.phases)):  # p = q + d(q); each sinusoid's phase is linear in the index too
        wavevector = warp.wavevectors[wave]
        wave_sin = np.sin(linear(wavevector @ matrix, wavevector @ offset + warp.phases[wave]))
        for c in range(3):
            p[c] += warp.amplitudes[wave, c] * wave_sin
    linear_world, world_offset = spec.affine[:3, :3], spec.affine[:3, 3]  # the bias is a sinusoid of x
    bias_phase = linear(spec.bias_wavevector @ linear_world, spec.bias_wavevector @ world_offset + spec.bias_phase)
    return [c.astype(np.float32) for c in p], 1.0 + spec.bias_amplitude * np.sin(bias_phase)


def _render_canonical(anatomy: _Anatomy, points: np.ndarray) -> np.ndarray:
    """Noise-free tissue intensity of the canonical anatomy.

    Args:
        anatomy: the case's canonical anatomy.
        points: (N, 3) canonical subject-frame positions in mm.

    Returns:
        (N,) float32 intensity: air 0, fat 0.2, CSF 0.25, soft tissue 0.45, brain 0.6, bone 1.0,
        enamel 1.4, with soft boundaries. Symmetric under x -> -x when both canines are present.
    """
    p = np.ascontiguousarray(points, dtype=np.float32)
    value = np.zeros(len(p), dtype=np.float32)
    for (lo, hi), signed_distance, intensity in _layers(anatomy):
        _paint(value, list(p.T), lo, hi, signed_distance, intensity)
    return value


def _paint(
    value: np.ndarray,
    p: list[np.ndarray],
    lo: np.ndarray,
    hi: np.ndarray,
    signed_distance: _SignedDistance,
    intensity: float,
) -> None:
    """Paint one layer in place: ``value += mask * (intensity - value)`` with the soft inside mask.

    Args:
        value: float32 tissue array of any shape (a view is fine), changed in place.
        p: three float32 arrays of ``value``'s shape, the canonical x, y, z (mm) of its entries.
        lo, hi: (3,) the layer's bounding box (mm); only entries within ``_REACH_MM`` of it change.
        signed_distance: the layer's signed distance (mm, negative inside).
        intensity: the layer's tissue intensity.
    """
    near = (p[0] >= lo[0] - _REACH_MM) & (p[0] <= hi[0] + _REACH_MM)
    for c in (1, 2):
        near &= (p[c] >= lo[c] - _REACH_MM) & (p[c] <= hi[c] + _REACH_MM)
    if not near.any():
        return
    points = np.stack([c[near] for c in p], axis=1)  # (M, 3), contiguous
    mask = 0.5 - 0.5 * np.tanh(signed_distance(points) / np.float32(2 * _EDGE_MM))
    before = value[near]
    value[near] = before + mask * (np.float32(intensity) - before)


def _layers(a: _Anatomy) -> Iterator[tuple[tuple[np.ndarray, np.ndarray], _SignedDistance, float]]:
    """Tissue layers in painting order: (bounding box (lo, hi) in mm, signed distance, intensity)."""
    centre, skin, inner = a.skull_centre, a.skull_radii + a.skin_thickness, a.skull_radii - a.skull_thickness
    nose_base = a.nose_apex - [0.0, a.nose_length, 0.0]
    inion_base = a.inion_apex + [0.0, a.inion_length, 0.0]
    vertex_base = a.vertex_apex - [0.0, 0.0, a.vertex_length]
    j = a.ventricle_junction
    petrous, petrous_half = a.ear_end + [4.0, 0.0, 0.0], np.array([10.0, 8.0, 8.0])
    canal_end = a.ear_end + [30.0, 0.0, 0.0]
    canine, others = _tooth_cones(a)
    tooth_points = [
        point for apex, base, _ in (canine, *others) for point in (apex, base, _mirror(apex), _mirror(base))
    ]

    yield _bounds([centre], skin), lambda p: _sd_ellipsoid(p, centre, skin), _SOFT
    yield (
        _bounds([a.nose_apex, nose_base], a.nose_radius),
        lambda p: _sd_cone(p, a.nose_apex, nose_base, a.nose_radius),
        _SOFT,
    )
    yield _bounds([centre], a.skull_radii), lambda p: _sd_ellipsoid(p, centre, a.skull_radii), _BONE
    yield (
        _bounds([a.inion_apex, inion_base], a.inion_radius),
        lambda p: _sd_cone(p, a.inion_apex, inion_base, a.inion_radius),
        _BONE,
    )
    yield (
        _bounds([a.vertex_apex, vertex_base], a.vertex_radius),
        lambda p: _sd_cone(p, a.vertex_apex, vertex_base, a.vertex_radius),
        _BONE,
    )
    yield _bounds([centre], inner), lambda p: _sd_ellipsoid(p, centre, inner), _BRAIN
    yield _bounds([j - [18.0, 28.0, 0.0], j + [18.0, 22.0, 0.0]], 4.5), lambda p: _sd_ventricles(p, j), _CSF
    for half, intensity in ((a.orbit_half + 3.0, _BONE), (a.orbit_half, _FAT)):
        yield (
            _bounds([a.orbit_centre, _mirror(a.orbit_centre)], half),
            _bilateral(lambda p, half=half: _sd_box(p, a.orbit_centre, half)),
            intensity,
        )
    yield (
        _bounds([petrous, _mirror(petrous)], petrous_half),
        _bilateral(lambda p: _sd_box(p, petrous, petrous_half)),
        _BONE,
    )
    yield (
        _bounds([a.ear_end, canal_end, _mirror(a.ear_end), _mirror(canal_end)], 4.0),
        _bilateral(lambda p: _sd_cylinder(p, a.ear_end, canal_end, 4.0)),
        _AIR,
    )
    gums = a.jaw_centre + _GUM_LIFT * _jaw_frame(a)[2]
    yield (
        _bounds([gums], a.jaw_radius + a.jaw_tube + _GUM_THICKEN),
        lambda p: _sd_jaw(a, p, _GUM_LIFT, _GUM_THICKEN),
        _SOFT,
    )
    yield _bounds([a.jaw_centre], a.jaw_radius + a.jaw_tube), lambda p: _sd_jaw(a, p), _BONE
    yield _bounds(tooth_points, _CANINE_RADIUS), lambda p: _sd_teeth(a, p), _ENAMEL


def _bounds(points: list[np.ndarray], pad) -> tuple[np.ndarray, np.ndarray]:
    """Axis-aligned box (lo, hi), each (3,) mm, around ``points`` padded by ``pad`` (scalar or (3,))."""
    points = np.asarray(points, dtype=float)
    return points.min(axis=0) - pad, points.max(axis=0) + pad


def _mirror(points: np.ndarray) -> np.ndarray:
    """Reflect (..., 3) points through the mid-sagittal plane (x -> -x)."""
    points = np.asarray(points)
    return points * np.array([-1, 1, 1], dtype=points.dtype)


def _bilateral(signed_distance: _SignedDistance) -> _SignedDistance:
    """Signed distance to the union of a right-side structure and its exact mirror image on the left."""
    return lambda p: np.minimum(signed_distance(p), signed_distance(_mirror(p)))


def _sd_ventricles(p: np.ndarray, junction: np.ndarray) -> np.ndarray:
    """Two crossing tubes: one along y (radius 4.5 mm), one along x (3.5 mm), axes meeting at ``junction``."""
    along_y = _sd_cylinder(p, junction - [0.0, 28.0, 0.0], junction + [0.0, 22.0, 0.0], 4.5)
    along_x = _sd_cylinder(p, junction - [18.0, 0.0, 0.0], junction + [18.0, 0.0, 0.0], 3.5)
    return np.minimum(along_y, along_x)


def _jaw_frame(a: _Anatomy) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Orthonormal frame of the jaw arch: e_x (right), e_v (forward, tilted down), e_w (arch axis, up)."""
    c, s = math.cos(a.jaw_tilt), math.sin(a.jaw_tilt)
    return np.array([1.0, 0.0, 0.0]), np.array([0.0, c, -s]), np.array([0.0, s, c])


def _sd_jaw(a: _Anatomy, p: np.ndarray, lift: float = 0.0, thicken: float = 0.0) -> np.ndarray:
    """Front half of a torus lying in the tilted jaw plane: the jaw bone, or with its tube centre lifted
    along the arch axis by ``lift`` mm and its tube radius grown by ``thicken`` mm, the gums around it."""
    e_x, e_v, e_w = _jaw_frame(a)
    d = p - (a.jaw_centre + lift * e_w).astype(p.dtype)
    u, v, w = (_dot(d, e.astype(p.dtype)) for e in (e_x, e_v, e_w))
    ring = np.sqrt((np.sqrt(u * u + v * v) - np.float32(a.jaw_radius)) ** 2 + w * w)
    return np.maximum(ring - np.float32(a.jaw_tube + thicken), -v)


def _tooth_cone(a: _Anatomy, angle: float, radius: float, height: float) -> _Cone:
    """(apex, base centre, base radius) of a right-side tooth at ``angle`` (rad) from the midline;
    ``height`` is the apex's height above the arch's tube centre (mm)."""
    e_x, e_v, e_w = _jaw_frame(a)
    on_arch = a.jaw_centre + a.jaw_radius * (math.sin(angle) * e_x + math.cos(angle) * e_v)
    return on_arch + height * e_w, on_arch + _TOOTH_ROOT * e_w, radius


def _tooth_cones(a: _Anatomy) -> tuple[_Cone, list[_Cone]]:
    """Right-side tooth cones (apex, base centre, base radius): the canine, then the other teeth."""
    canine = _tooth_cone(a, a.canine_angle, _CANINE_RADIUS, _CANINE_HEIGHT)
    return canine, [_tooth_cone(a, math.radians(angle), r, h) for angle, r, h in (*_INCISORS, *_PREMOLARS)]


def _sd_teeth(a: _Anatomy, p: np.ndarray) -> np.ndarray:
    """Union of the teeth on both sides; a missing canine (``a.canines``) is left out."""
    mirrored = _mirror(p)
    canine, others = _tooth_cones(a)
    distances = [_sd_cone(x, *cone) for cone in others for x in (p, mirrored)]
    distances += [_sd_cone(x, *canine) for x, present in zip((mirrored, p), a.canines, strict=True) if present]
    return np.min(distances, axis=0)


def _norm(d: np.ndarray) -> np.ndarray:
    """(N,) Euclidean norms of (N, 3) vectors."""
    return np.sqrt(np.einsum("ij,ij->i", d, d))


def _sd_ellipsoid(p: np.ndarray, centre: np.ndarray, radii: np.ndarray) -> np.ndarray:
    """Approximate signed distance (exact on the surface) to an axis-aligned ellipsoid."""
    d = p - centre.astype(p.dtype)
    k0 = _norm(d / radii.astype(p.dtype))
    k1 = _norm(d / (radii * radii).astype(p.dtype))
    return np.where(k1 > 1e-9, k0 * (k0 - 1) / np.maximum(k1, 1e-9), -radii.min()).astype(p.dtype)


def _sd_box(p: np.ndarray, centre: np.ndarray, half: np.ndarray) -> np.ndarray:
    """Signed distance to an axis-aligned box."""
    q = np.abs(p - centre.astype(p.dtype)) - half.astype(p.dtype)
    return _norm(np.maximum(q, 0)) + np.minimum(q.max(axis=1), 0)


def _axial(p: np.ndarray, start: np.ndarray, end: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """Position along the segment start -> end (mm from start), distance from its line, and its length."""
    axis = (end - start).astype(p.dtype)
    length = float(np.linalg.norm(axis))
    axis /= length
    d = p - start.astype(p.dtype)
    along = _dot(d, axis)
    radial = _norm(d - along[:, None] * axis)
    return along, radial, length


def _sd_cylinder(p: np.ndarray, start: np.ndarray, end: np.ndarray, radius: float) -> np.ndarray:
    """Approximate signed distance to a capped cylinder from ``start`` to ``end``."""
    along, radial, length = _axial(p, start, end)
    return np.maximum(radial - np.float32(radius), np.maximum(-along, along - np.float32(length)))


def _sd_cone(p: np.ndarray, apex: np.ndarray, base: np.ndarray, radius: float) -> np.ndarray:
    """Approximate signed distance to a capped cone from ``apex`` to the base disc at ``base``."""
    along, radial, height = _axial(p, apex, base)
    slant = math.hypot(height, radius)
    cos, sin = np.float32(height / slant), np.float32(radius / slant)  # of the half-angle
    lateral = radial * cos - along * sin  # from the slanted surface
    beyond_apex = along * cos + radial * sin < 0  # where the apex is the nearest surface point
    lateral = np.where(beyond_apex, np.sqrt(along * along + radial * radial), lateral)
    return np.maximum(lateral, along - np.float32(height))


# ----------------------------------------------------------------------------- output


def _save_image(path: Path, image: np.ndarray, affine: np.ndarray) -> None:
    """Write a NIfTI atomically: int16 multiples of ``_QUANTUM`` with ``scl_slope = _QUANTUM``, so readers
    get ``image`` back exactly, and qform = sform = ``affine`` (code 1, scanner) in mm.

    Args:
        path: ``.nii.gz`` file to write.
        image: float32 volume whose values are multiples of ``_QUANTUM`` within the int16 range.
        affine: (4, 4) voxel -> world RAS mm.
    """
    quanta = np.rint(image / np.float32(_QUANTUM))
    assert np.abs(quanta).max(initial=0) <= np.iinfo(np.int16).max, "intensity beyond the int16 range"
    nifti = nib.Nifti1Image(quanta.astype(np.int16), affine)
    nifti.header.set_slope_inter(_QUANTUM, 0.0)
    nifti.set_qform(affine, code=1)
    nifti.set_sform(affine, code=1)
    nifti.header.set_xyzt_units("mm")
    with atomic_path(path) as tmp:
        nib.save(nifti, tmp)
