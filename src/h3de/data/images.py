"""Opening images: the one place that reads NIfTI and NRRD volumes and refuses bad ones.

:func:`read_header` reads only the header (cheap; the data module checks every case with it before
anything is written) and :func:`read_volume` reads the voxels too (the ``LoadVolumed`` transform of
the pipelines). Both return the same :class:`ImageHeader`, whose affine maps voxel indices to world
RAS millimetres whatever the file's convention: NIfTI is RAS already; an NRRD's ``space``
(``left-posterior-superior``, ``left-anterior-superior`` or ``right-anterior-superior``, long or short
form) says which world axes to negate. Lengths in metres or microns are scaled to millimetres: a NIfTI's
``xyzt_units`` (unset or unknown means mm, as NIfTI viewers assume) and an NRRD's ``space units``
(``mm``, ``m``, ``um`` or ``µm``; absent or empty means mm; any other unit is refused).

Every problem is a :class:`~h3de.errors.DataError` naming the file and the value: a file that cannot
be parsed or ends early, anything but one 3D volume, a spacing that is not positive and finite, a
singular or non-finite affine, and voxels that are NaN or infinite (refused, with their count: they
would turn every loss NaN) or all equal (a blank image). NIfTI headers are parsed without nibabel's
silent fixes (zero pixdim set to 1, negative pixdim to its absolute value), whose log lines name no file.
"""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import nrrd
import numpy as np
from isal import igzip
from nibabel.openers import ImageOpener

from h3de.errors import DataError, H3deError

__all__ = ["IMAGE_SUFFIXES", "ImageHeader", "read_header", "read_volume", "check_voxels"]

IMAGE_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr")

# nibabel reports header problems it fixes to a logger, without the file name; h3de raises instead
_NIBABEL_REPORTS = logging.getLogger("h3de.images.nibabel")
_NIBABEL_REPORTS.addHandler(logging.NullHandler())
_NIBABEL_REPORTS.propagate = False
_NIBABEL_ERROR_LEVEL = 40  # nibabel's default: problems at or above it raise

# sign of each world axis relative to RAS, for the anatomical spaces of the NRRD format
_NRRD_SPACES = {
    "right-anterior-superior": (1.0, 1.0, 1.0),
    "ras": (1.0, 1.0, 1.0),
    "left-anterior-superior": (-1.0, 1.0, 1.0),
    "las": (-1.0, 1.0, 1.0),
    "left-posterior-superior": (-1.0, -1.0, 1.0),
    "lps": (-1.0, -1.0, 1.0),
}
# millimetres per length unit: NIfTI's spatial xyzt_units code (0 unknown and anything else: mm) and NRRD's names
_NIFTI_MM_PER_UNIT = {1: 1000.0, 2: 1.0, 3: 1e-3}  # metre, millimetre, micron
_NRRD_MM_PER_UNIT = {"": 1.0, "mm": 1.0, "m": 1000.0, "um": 1e-3, "µm": 1e-3, "μm": 1e-3}  # micro sign, Greek mu


@dataclass(frozen=True)
class ImageHeader:
    """Geometry of a checked 3D volume.

    Attributes:
        path: the image file.
        shape: (X, Y, Z) voxels.
        affine: (4, 4) float64, voxel index -> world RAS mm.
    """

    path: Path
    shape: tuple[int, int, int]
    affine: np.ndarray


def read_header(path: str | Path) -> ImageHeader:
    """Read and check an image's header without its voxel data.

    Raises:
        DataError: unsupported suffix, unreadable header, not one 3D volume, bad spacing or affine.
    """
    path = Path(path)
    if _is_nifti(path):
        with _reading(path), ImageOpener(path) as f:
            return _nifti_geometry(path, _nifti_header(path, f))
    with _reading(path):
        header = nrrd.read_header(str(path))
    return _nrrd_geometry(path, header)


def read_volume(path: str | Path) -> tuple[np.ndarray, ImageHeader]:
    """Read an image's voxels and header, and check both.

    Returns:
        The (X, Y, Z) float32 intensities (NIfTI scaling applied) and the image's :class:`ImageHeader`.

    Raises:
        DataError: anything :func:`read_header` refuses, data that cannot be read in full (a truncated
            or corrupt file), and the voxel problems of :func:`check_voxels`.
    """
    path = Path(path)
    if _is_nifti(path):
        with _reading(path):
            f = io.BytesIO(_nifti_bytes(path))
            nifti = _nifti_header(path, f)
            header = _nifti_geometry(path, nifti)
            data = np.array(nifti.data_from_fileobj(f), dtype=np.float32)  # a copy, not a view of the bytes
    else:
        with _reading(path):
            data, fields = nrrd.read(str(path), index_order="F")
        header = _nrrd_geometry(path, fields)
        data = np.asarray(data, dtype=np.float32)
    volume = data.reshape(header.shape)  # drops the size-1 non-spatial axes the header check allowed
    check_voxels(path, volume)
    return volume, header


def _nifti_bytes(path: Path) -> bytes:
    """The whole NIfTI file, decompressed in one call by ISA-L when gzipped: about twice as fast as the zlib
    stream nibabel reads through (``benchmarks/predict_cost.md``)."""
    raw = path.read_bytes()
    return igzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw


def check_voxels(path: str | Path, volume: np.ndarray) -> None:
    """Refuse intensities no network can learn from.

    Args:
        path: the image file (named in the error).
        volume: (X, Y, Z) intensities.

    Raises:
        DataError: any voxel NaN or infinite (with the counts), or every voxel equal.
    """
    low, high = volume.min(), volume.max()  # both finite exactly when every voxel is (NaN propagates)
    if not (np.isfinite(low) and np.isfinite(high)):
        nan = int(np.isnan(volume).sum())
        inf = int(np.isinf(volume).sum())
        if nan == volume.size:
            raise DataError(f"{path}: all {volume.size} voxels are NaN")
        raise DataError(
            f"{path}: {nan} NaN and {inf} infinite voxels (of {volume.size}); replace them, for example with "
            "the background intensity"
        )
    if low == high:
        raise DataError(f"{path}: all {volume.size} voxels equal {float(low):g} (a blank image)")


@contextlib.contextmanager
def _reading(path: Path) -> Iterator[None]:
    """Turn any failure to parse ``path`` (a corrupt or truncated file) into one DataError that names it."""
    try:
        yield
    except H3deError:
        raise
    except Exception as e:
        raise DataError(f"{path}: cannot read image ({type(e).__name__}: {e})") from None


def _is_nifti(path: Path) -> bool:
    name = path.name.lower()
    if name.endswith((".nii", ".nii.gz")):
        return True
    if name.endswith((".nrrd", ".nhdr")):
        return False
    raise DataError(f"{path}: unsupported image format (expected {', '.join(IMAGE_SUFFIXES)})")


def _nifti_header(path: Path, fileobj) -> nib.Nifti1Header:
    """The NIfTI-1 or NIfTI-2 header at the start of ``fileobj``, as stored (nothing fixed yet)."""
    block = fileobj.read(nib.Nifti2Header.sizeof_hdr)
    for kind in (nib.Nifti1Header, nib.Nifti2Header):
        if kind.may_contain_header(block):
            return kind(block[: kind.sizeof_hdr], check=False)
    raise DataError(f"{path}: cannot read image (no NIfTI-1 or NIfTI-2 header)")


def _nifti_geometry(path: Path, header: nib.Nifti1Header) -> ImageHeader:
    shape = _volume_shape(path, header.get_data_shape(), spatial_axes=(0, 1, 2))
    pixdim = header["pixdim"][1:4].astype(np.float64)
    if not (np.all(np.isfinite(pixdim)) and np.all(pixdim > 0)):
        raise DataError(f"{path}: voxel spacing (pixdim[1:4]) must be positive and finite, got {_values(pixdim)}")
    header.check_fix(logger=_NIBABEL_REPORTS, error_level=_NIBABEL_ERROR_LEVEL)
    affine = np.array(header.get_best_affine(), dtype=np.float64)  # in the file's unit, offsets too
    affine[:3] *= _NIFTI_MM_PER_UNIT.get(int(header["xyzt_units"]) & 0x07, 1.0)  # the low 3 bits: space
    return _checked(path, shape, affine)


def _nrrd_geometry(path: Path, header: dict) -> ImageHeader:
    sizes = tuple(int(s) for s in header["sizes"])
    if "space directions" not in header:
        raise DataError(f"{path}: NRRD header has no 'space directions', so its voxels have no world position")
    directions = np.asarray(header["space directions"], dtype=np.float64)  # (axes, space dims); NaN = "none"
    spatial_axes = tuple(i for i, row in enumerate(directions) if not np.all(np.isnan(row)))
    shape = _volume_shape(path, sizes, spatial_axes)
    space = str(header.get("space", "")).lower()
    if space not in _NRRD_SPACES:
        known = ", ".join(name for name in _NRRD_SPACES if len(name) > 3)
        found = f"space '{header['space']}'" if "space" in header else "no 'space' field"
        raise DataError(f"{path}: NRRD header has {found}; h3de needs an anatomical space: {known} (or RAS, LAS, LPS)")
    if "space origin" not in header:
        raise DataError(f"{path}: NRRD header has no 'space origin'")
    affine = np.eye(4)
    affine[:3, :3] = directions[list(spatial_axes)].T  # columns: world step of one voxel along each axis
    affine[:3, 3] = np.asarray(header["space origin"], dtype=np.float64)
    scale = np.asarray(_NRRD_SPACES[space]) * _nrrd_mm_per_unit(path, header)
    affine = np.diag([*scale, 1.0]) @ affine  # named space and its units -> RAS mm
    return _checked(path, shape, affine)


def _nrrd_mm_per_unit(path: Path, header: dict) -> np.ndarray:
    """Millimetres per unit of each world axis, from the optional ``space units`` field."""
    if "space units" not in header:
        return np.ones(3)
    units = [str(u).strip() for u in header["space units"]]
    unknown = [u for u in units if u.lower() not in _NRRD_MM_PER_UNIT]
    if len(units) != 3 or unknown:
        raise DataError(f"{path}: NRRD 'space units' {units} are not three of mm, m, um (µm)")
    return np.array([_NRRD_MM_PER_UNIT[u.lower()] for u in units])


def _volume_shape(path: Path, shape: tuple[int, ...], spatial_axes: tuple[int, ...]) -> tuple[int, int, int]:
    """The (X, Y, Z) of an array of ``shape`` whose other axes must all have size 1 (one volume)."""
    others = [s for i, s in enumerate(shape) if i not in spatial_axes]
    if len(spatial_axes) != 3 or len(shape) < 3 or any(s != 1 for s in others):
        raise DataError(f"{path}: expected a 3D volume, got shape {tuple(shape)}")
    spatial = tuple(int(shape[i]) for i in spatial_axes)
    if min(spatial) < 1:
        raise DataError(f"{path}: expected a 3D volume, got an empty axis in shape {tuple(shape)}")
    return spatial


def _checked(path: Path, shape: tuple[int, int, int], affine: np.ndarray) -> ImageHeader:
    affine = np.asarray(affine, dtype=np.float64)
    if not np.all(np.isfinite(affine)):
        raise DataError(f"{path}: voxel-to-world affine is not finite: {_values(affine[:3])}")
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    if not np.all(spacing > 0):
        raise DataError(f"{path}: voxel spacing must be positive, got {_values(spacing)} mm")
    if abs(np.linalg.det(affine[:3, :3])) <= 1e-6 * np.prod(spacing):
        raise DataError(f"{path}: voxel-to-world affine is singular (its axes are parallel): {_values(affine[:3])}")
    return ImageHeader(path, shape, affine)


def _values(array: np.ndarray) -> str:
    return str((np.round(np.asarray(array, dtype=np.float64), 4) + 0.0).tolist())  # one line, no -0.0
