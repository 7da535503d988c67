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
  (sd 0.01-0.03), stored in steps of 1/1024.

A voxel's intensity is rendered at its world position ``x = affine @ [i, j, k, 1]``:
``q = R^T (x - t)``, ``p = q + d(q)``, ``image = scale * bias(x) * tissue(p) + noise``. A canonical
landmark ``c`` is stored at ``R q + t`` with ``q + d(q) = c``, so landmarks sit exactly on the
rendered features. Tissue is point-sampled with soft (~1 mm) edges, so at coarse spacings thin tips
(nose, teeth) may fall between voxel centres.
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from h3de.data.landmark_io import write_landmarks
from h3de.data.manifest import SPLITS, Case, Manifest, load_manifest, write_manifest
from h3de.io_utils import atomic_path

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

_GENERATOR_VERSION = 1
_ABSENT_PROBABILITY = 0.2
_FOV_MM = 240.0  # voxel centres span at least this along every axis
_QUANTUM = 1 / 1024  # intensities are stored in these steps, like a scanner's integers (halves the files)
_SLICE_FACTOR = 1.5
_EDGE_MM = 0.75  # sigmoid scale of the soft tissue boundaries
_REACH_MM = 12.0  # beyond this distance from its bounding box a layer changes nothing
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
) -> Manifest:
    """Generate the phantom dataset and its manifest.

    Writes ``images/case_<index>.nii.gz`` (float32), ``landmarks/case_<index>.mrk.json`` (RAS world mm,
    absent landmarks "missing") and, last, ``dataset.json``; an existing ``dataset.json`` is removed
    first, so one exists only when every case is written. Case ``i`` depends only on ``(seed, i)``
    and ``voxel_mm``.

    Args:
        out_dir: output folder, created if needed.
        seed: non-negative random seed.
        num_cases: number of cases, >= 3 so every split gets one.
        voxel_mm: in-plane voxel spacing in mm (jittered +-10 % per case; slices are 1.5x thicker).
        split_fractions: positive (train, val, test) fractions summing to 1; cases are assigned in
            order, every split gets at least one.

    Returns:
        The manifest as loaded back from ``dataset.json``.

    Raises:
        ValueError: naming the invalid argument.
    """
    fractions = _check_arguments(seed, num_cases, voxel_mm, split_fractions)
    out = Path(out_dir).resolve()
    manifest_path = out / "dataset.json"
    manifest_path.unlink(missing_ok=True)
    cases = []
    for index, split in enumerate(_assign_splits(num_cases, fractions)):
        case_id = f"case_{index:03d}"
        spec = _sample_case(seed, index, voxel_mm)
        image_path, landmark_path = (
            out / "images" / f"{case_id}.nii.gz",
            out / "landmarks" / f"{case_id}.mrk.json",
        )
        _save_image(image_path, _render_image(spec), spec.affine)
        write_landmarks(landmark_path, list(PHANTOM_LANDMARKS), _case_landmarks(spec))
        cases.append(Case(case_id, image_path, landmark_path, split))
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


def _check_arguments(seed, num_cases, voxel_mm, split_fractions) -> tuple[float, float, float]:
    """Validate ``generate_phantom``'s arguments; return the split fractions as floats."""
    if not _is_integer(seed) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if not _is_integer(num_cases) or num_cases < 3:
        raise ValueError(f"num_cases must be an integer >= 3 so every split gets a case, got {num_cases!r}")
    if not _is_real(voxel_mm) or voxel_mm <= 0:
        raise ValueError(f"voxel_mm must be a positive number of mm, got {voxel_mm!r}")
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


def _assign_splits(num_cases: int, fractions: tuple[float, float, float]) -> list[str]:
    """Split names of the cases in order: counts nearest ``num_cases * fractions``, each >= 1."""
    ideal = np.asarray(fractions) * num_cases
    counts = np.maximum(np.floor(ideal), 1).astype(int)
    while counts.sum() < num_cases:
        counts[np.argmax(ideal - counts)] += 1
    while counts.sum() > num_cases:
        over = np.where(counts > 1, counts - ideal, -np.inf)
        counts[np.argmax(over)] -= 1
    return [split for split, count in zip(SPLITS, counts, strict=True) for _ in range(count)]


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


def _world_to_canonical(spec: _CaseSpec, world: np.ndarray) -> np.ndarray:
    """Map (N, 3) world RAS mm to the canonical frame: ``q = R^T (x - t)``, ``p = q + d(q)``."""
    q = _dot(world - spec.translation, spec.rotation)
    return q + _displacement(spec.warp, q)


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


def _render_image(spec: _CaseSpec) -> np.ndarray:
    """The case's float32 volume of ``spec.shape``: the tissue at each voxel's world position, scaled,
    biased, noisy and quantised."""
    index = np.indices(spec.shape).reshape(3, -1).T.astype(float)
    world = _dot(index, spec.affine[:3, :3].T) + spec.affine[:3, 3]  # (N, 3)
    tissue = _render_canonical(spec.anatomy, _world_to_canonical(spec, world))
    bias = 1.0 + spec.bias_amplitude * np.sin(_dot(world, spec.bias_wavevector) + spec.bias_phase)
    noise = np.random.default_rng(spec.noise_seed).normal(0.0, spec.noise_sd, len(world))
    image = spec.scale * bias * tissue + noise
    return (np.round(image / _QUANTUM) * _QUANTUM).astype(np.float32).reshape(spec.shape)


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
        near = np.flatnonzero(_in_box(p, lo - _REACH_MM, hi + _REACH_MM))
        mask = 0.5 - 0.5 * np.tanh(signed_distance(p[near]) / np.float32(2 * _EDGE_MM))
        value[near] += mask * (np.float32(intensity) - value[near])
    return value


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


def _in_box(p: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """(N,) bool: which of the (N, 3) points lie inside the box [lo, hi]."""
    x, y, z = p.T
    return (x >= lo[0]) & (x <= hi[0]) & (y >= lo[1]) & (y <= hi[1]) & (z >= lo[2]) & (z <= hi[2])


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
    """Write a float32 NIfTI atomically with qform = sform = ``affine`` (code 1, scanner) in mm."""
    nifti = nib.Nifti1Image(image, affine)
    nifti.set_qform(affine, code=1)
    nifti.set_sform(affine, code=1)
    nifti.header.set_xyzt_units("mm")
    with atomic_path(path) as tmp:
        nib.save(nifti, tmp)
