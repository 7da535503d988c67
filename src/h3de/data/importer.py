"""``h3de data import``: a manifest for a folder of images and a folder of landmark files.

Conventions:

- **Pairing.** The case id is the file name without its suffix (``case01.nii.gz`` and ``case01.mrk.json``
  are case ``case01``), matched exactly; both folders are read without their subfolders, and hidden files
  are skipped. Images are NIfTI/NRRD (:data:`~h3de.data.images.IMAGE_SUFFIXES`), landmark files any format
  of :mod:`~h3de.data.landmark_io`. Images without a landmark file and landmark files without an image are
  listed, not fatal; two files of one case id on the same side are an error.
- **Landmark names** are the union of the files' names, in first-seen order over the cases sorted by id.
  A landmark missing from a file is absent (NaN) in that case. Names missing from some files are reported
  with the files; a name in at most half of them is reported as a likely typo or mislabel, with the
  closest other names.
- **Landmark files written.** Every case gets h3de's own ``landmarks/<case>.json`` under the output folder
  (RAS mm, the manifest's names in order, absent = ``null``), so the manifest never depends on a source
  format's quirks (LPS, missing names). Images are referenced where they are, by a path relative to
  ``dataset.json``; no source file is copied or changed.
- **Checks.** Every image header is read and every landmark file parsed before anything is written; a
  landmark outside its image is reported with its case (:mod:`h3de.data.bounds`, with a hint when it looks
  like LPS given as RAS). Mirrored pairs follow :mod:`h3de.data.mirrored`.
- **Splits** are drawn from the seed over the case ids (the same ids, fractions and seed give the same
  splits, whatever the file system's order).
- **Writing.** The output folder must be new or empty. The landmark files are written first and
  ``dataset.json`` last, each atomically; if writing fails, what was written is removed, and an error
  before writing leaves no output folder.
"""

from __future__ import annotations

import difflib
import math
import numbers
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from h3de.data.bounds import describe_outside
from h3de.data.images import IMAGE_SUFFIXES, ImageHeader, read_header
from h3de.data.landmark_io import LANDMARK_SUFFIXES, read_landmarks, write_landmarks
from h3de.data.manifest import SPLITS, Case, Manifest, load_manifest, write_manifest
from h3de.data.mirrored import detect_mirrored_pairs, parse_mirrored_pairs
from h3de.errors import DataError

__all__ = [
    "SourceCase",
    "ImportReport",
    "import_dataset",
    "check_output_folder",
    "check_split_fractions",
    "random_splits",
    "assign_splits",
    "landmark_union",
    "choose_mirrored_pairs",
    "write_dataset",
]

DEFAULT_SPLIT = (0.7, 0.15, 0.15)


@dataclass(frozen=True)
class SourceCase:
    """One case read from a source dataset.

    Attributes:
        id: case id (also the name of its landmark file under the output folder).
        image: the source image file.
        header: the image's checked geometry.
        names: landmark names, one per row of ``positions``.
        positions: (L, 3) float64 world RAS mm; NaN rows are absent landmarks.
        source: the file the landmarks came from (named in reports).
        split: the split the source assigns, or None.
    """

    id: str
    image: Path
    header: ImageHeader
    names: tuple[str, ...]
    positions: np.ndarray
    source: Path
    split: str | None = None


@dataclass(frozen=True)
class ImportReport:
    """What an import or conversion wrote and what it found.

    Attributes:
        manifest: the manifest as loaded back from ``dataset.json``.
        warnings: one line per problem worth a look (names, landmarks outside their image, ambiguous
            mirrored names, empty splits, disagreeing spacings), each naming the case or files.
        unpaired_images: images without a landmark file, skipped.
        unpaired_landmarks: landmark files without an image, skipped.
        splits: where the splits came from ("the source's folders" or "drawn with seed S").
    """

    manifest: Manifest
    warnings: tuple[str, ...]
    unpaired_images: tuple[Path, ...]
    unpaired_landmarks: tuple[Path, ...]
    splits: str


def import_dataset(
    images: str | os.PathLike,
    landmarks: str | os.PathLike,
    out: str | os.PathLike,
    split_fractions: Sequence[float] = DEFAULT_SPLIT,
    seed: int = 0,
    mirrored: str = "auto",
    name: str | None = None,
) -> ImportReport:
    """Pair images with landmark files by case id and write ``dataset.json`` under ``out``.

    Args:
        images: folder of NIfTI/NRRD images.
        landmarks: folder of landmark files (may be ``images`` itself).
        out: output folder, new or empty: ``dataset.json`` and ``landmarks/<case>.json``.
        split_fractions: (train, val, test) fractions, non-negative, summing to 1.
        seed: non-negative seed of the split draw.
        mirrored: ``"auto"`` (detect by name), ``"none"``, or pairs ``"A:B,C:D"``.
        name: the dataset's name (default: the output folder's name).

    Returns:
        The :class:`ImportReport`.

    Raises:
        ValueError: a bad split, seed or ``mirrored`` value (naming it).
        DataError: a missing or empty folder, no image with a landmark file, two files of one case, an
            unreadable image header or landmark file (naming the file), or a non-empty output folder.
    """
    fractions = check_split_fractions(split_fractions)
    _check_seed(seed)
    out = check_output_folder(out)
    image_files = _files_by_case(images, IMAGE_SUFFIXES, "image")
    landmark_files = _files_by_case(landmarks, LANDMARK_SUFFIXES, "landmark file")
    if not image_files and not landmark_files:
        raise DataError(
            f"no images ({', '.join(IMAGE_SUFFIXES)}) in {images} and no landmark files "
            f"({', '.join(LANDMARK_SUFFIXES)}) in {landmarks}"
        )
    ids = sorted(set(image_files) & set(landmark_files))
    unpaired_images = tuple(image_files[i] for i in sorted(set(image_files) - set(ids)))
    unpaired_landmarks = tuple(landmark_files[i] for i in sorted(set(landmark_files) - set(ids)))
    if not ids:
        raise DataError(
            f"no image in {images} has a landmark file in {landmarks} ({len(image_files)} images, "
            f"{len(landmark_files)} landmark files): a case id is the file name without its suffix, and "
            f"must be the same on both sides (images: {_listing(unpaired_images)}; landmark files: "
            f"{_listing(unpaired_landmarks)})"
        )
    cases = []
    for case_id in ids:
        header = read_header(image_files[case_id])
        names, positions = read_landmarks(landmark_files[case_id])
        cases.append(
            SourceCase(case_id, image_files[case_id], header, tuple(names), positions, landmark_files[case_id])
        )
    names = landmark_union(cases)
    pairs, warnings = choose_mirrored_pairs(mirrored, names)
    warnings = name_disagreements(cases, names) + warnings
    splits = random_splits(ids, fractions, seed)
    cases = [_with_split(case, splits[case.id]) for case in cases]
    description = f"imported by h3de data import from {Path(images).resolve()} and {Path(landmarks).resolve()}"
    source = {"images": str(Path(images).resolve()), "landmarks": str(Path(landmarks).resolve())}
    extra = {"import": {**source, "split_fractions": list(fractions), "seed": int(seed)}}
    manifest, written_warnings = write_dataset(out, cases, names, pairs, name or out.name, description, extra)
    return ImportReport(
        manifest, tuple(warnings + written_warnings), unpaired_images, unpaired_landmarks, f"drawn with seed {seed}"
    )


def check_output_folder(out: str | os.PathLike) -> Path:
    """The absolute output folder, which must not exist yet or be empty.

    Raises:
        DataError: ``out`` is a file or a folder with anything in it.
    """
    out = Path(out).resolve()
    if out.exists() and not out.is_dir():
        raise DataError(f"output folder {out} is a file")
    if out.is_dir() and any(out.iterdir()):
        raise DataError(f"output folder {out} is not empty; choose a new folder or empty it first")
    return out


def check_split_fractions(fractions: Sequence[float]) -> tuple[float, float, float]:
    """The (train, val, test) fractions as floats.

    Raises:
        ValueError: not three finite non-negative numbers summing to 1.
    """
    values = tuple(fractions)
    valid = (
        len(values) == len(SPLITS)
        and all(isinstance(f, numbers.Real) and not isinstance(f, bool) and math.isfinite(f) and f >= 0 for f in values)
        and abs(sum(values) - 1.0) <= 1e-6
    )
    if not valid:
        raise ValueError(
            f"split fractions must be 3 non-negative numbers (train, val, test) summing to 1, got {fractions!r}"
        )
    return tuple(float(f) for f in values)


def _check_seed(seed: int) -> None:
    if not isinstance(seed, numbers.Integral) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")


def random_splits(ids: Sequence[str], fractions: Sequence[float], seed: int) -> dict[str, str]:
    """Split of every case id, drawn from ``seed`` over the sorted ids.

    Split sizes are the nearest to ``len(ids) * fractions`` (largest remainders); a split of positive
    fraction gets at least one case while the largest split can spare one.
    """
    ordered = sorted(ids)
    ideal = np.asarray(fractions, dtype=np.float64) * len(ordered)
    counts = np.floor(ideal).astype(int)
    for index in np.argsort(-(ideal - counts), kind="stable")[: len(ordered) - counts.sum()]:
        counts[index] += 1
    wanted = np.asarray(fractions) > 0
    while (wanted & (counts == 0)).any() and counts.max() > 1:
        counts[np.argmax(counts)] -= 1
        counts[np.flatnonzero(wanted & (counts == 0))[0]] += 1
    order = np.random.default_rng(seed).permutation(len(ordered))
    labels = np.repeat(np.arange(len(SPLITS)), counts)
    return {ordered[i]: SPLITS[label] for i, label in zip(order, labels, strict=True)}


def assign_splits(
    cases: Sequence[SourceCase], split_fractions: Sequence[float] | None, seed: int
) -> tuple[list[SourceCase], str]:
    """The source's splits when every case has one and no fractions are given, else splits drawn from ``seed``.

    Returns:
        The cases with their splits, and where the splits came from (for the report).

    Raises:
        ValueError: bad fractions or seed.
    """
    if split_fractions is None and cases and all(c.split in SPLITS for c in cases):
        return list(cases), "the source's folders"
    fractions = check_split_fractions(DEFAULT_SPLIT if split_fractions is None else split_fractions)
    _check_seed(seed)
    splits = random_splits([c.id for c in cases], fractions, seed)
    return [_with_split(c, splits[c.id]) for c in cases], f"drawn with seed {seed}"


def landmark_union(cases: Sequence[SourceCase]) -> tuple[str, ...]:
    """The landmark names of all cases, in first-seen order."""
    return tuple(dict.fromkeys(n for case in cases for n in case.names))


def name_disagreements(cases: Sequence[SourceCase], names: Sequence[str]) -> list[str]:
    """One line per landmark name that some cases' files lack, naming the files."""
    lines = []
    for name in names:
        having = [c.source for c in cases if name in c.names]
        lacking = [c.source for c in cases if name not in c.names]
        if not lacking:
            continue
        close = difflib.get_close_matches(name, [n for n in names if n != name], n=2, cutoff=0.6)
        hint = f"; close to {', '.join(repr(c) for c in close)}" if close else ""
        if 2 * len(having) <= len(cases):
            lines.append(
                f"landmark '{name}' is only in {len(having)} of {len(cases)} landmark files ({_listing(having)}): "
                f"a typo or a mislabel?{hint}; it is absent in the other cases"
            )
        else:
            lines.append(
                f"landmark '{name}' is missing from {len(lacking)} of {len(cases)} landmark files "
                f"({_listing(lacking)}) and is absent in those cases{hint}"
            )
    return lines


def choose_mirrored_pairs(mirrored: str, names: Sequence[str]) -> tuple[tuple[tuple[str, str], ...], list[str]]:
    """Mirrored pairs for ``mirrored`` ("auto", "none" or "A:B,...") and warnings about ambiguous names.

    Raises:
        ValueError: a bad ``A:B,...`` list (see :func:`~h3de.data.mirrored.parse_mirrored_pairs`).
    """
    if mirrored == "none":
        return (), []
    if mirrored != "auto":
        return parse_mirrored_pairs(mirrored, names), []
    pairs, ambiguous = detect_mirrored_pairs(names)
    if not ambiguous:
        return pairs, []
    listed = ", ".join(repr(n) for n in ambiguous)
    return pairs, [f"mirrored pairs: {listed} could each pair with more than one name, left unpaired (use --mirrored)"]


def write_dataset(
    out: Path,
    cases: Sequence[SourceCase],
    names: Sequence[str],
    mirrored_pairs: Sequence[tuple[str, str]],
    name: str,
    description: str,
    extra: dict,
) -> tuple[Manifest, list[str]]:
    """Write ``landmarks/<case>.json`` of every case, then ``dataset.json``, under the checked folder ``out``.

    Every case must have a split. Landmarks outside their image are reported, not changed.

    Returns:
        The manifest as loaded back, and warnings: landmarks outside their image, splits without cases.

    Raises:
        DataError: no landmark names, or two cases with one id (nothing is written then).
    """
    if not names:
        raise DataError("no landmark in any case")
    seen: dict[str, Path] = {}
    for case in cases:
        if case.id in seen:
            raise DataError(f"case id '{case.id}' appears twice: {seen[case.id]} and {case.source}")
        seen[case.id] = case.source
    warnings = [
        line
        for case in cases
        if (line := describe_outside(case.id, case.names, case.header, case.positions)) is not None
    ]
    counts = {s: sum(c.split == s for c in cases) for s in SPLITS}
    warnings += [f"the '{s}' split has no cases" for s, n in counts.items() if n == 0]
    created = not out.exists()
    manifest_cases = []
    try:
        for case in cases:
            path = out / "landmarks" / f"{case.id}.json"
            write_landmarks(path, list(names), _in_order(case, names))
            manifest_cases.append(Case(case.id, Path(os.path.abspath(case.image)), path, case.split))
        path = out / "dataset.json"
        manifest = Manifest(path, name, tuple(names), tuple(mirrored_pairs), tuple(manifest_cases), description, extra)
        write_manifest(path, manifest)
        return load_manifest(path), warnings
    except BaseException:
        shutil.rmtree(out if created else out / "landmarks", ignore_errors=True)
        (out / "dataset.json").unlink(missing_ok=True)
        raise


def _in_order(case: SourceCase, names: Sequence[str]) -> np.ndarray:
    """(len(names), 3) positions of ``case`` in ``names`` order; NaN for names it lacks."""
    index = {n: i for i, n in enumerate(case.names)}
    positions = np.full((len(names), 3), np.nan)
    for row, name in enumerate(names):
        if name in index:
            positions[row] = case.positions[index[name]]
    return positions


def _with_split(case: SourceCase, split: str) -> SourceCase:
    return SourceCase(case.id, case.image, case.header, case.names, case.positions, case.source, split)


def _files_by_case(folder: str | os.PathLike, suffixes: Sequence[str], what: str) -> dict[str, Path]:
    """Case id -> file of ``folder`` (not its subfolders) whose name ends with one of ``suffixes``."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{what} folder not found: {folder}")
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        lower = path.name.lower()
        suffix = next((s for s in suffixes if lower.endswith(s)), None)
        if suffix is None or path.name.startswith(".") or not path.is_file():
            continue
        case_id = path.name[: -len(suffix)]
        if case_id in found:
            raise DataError(f"case '{case_id}' has two {what}s: {found[case_id]} and {path}")
        found[case_id] = Path(os.path.abspath(path))
    return found


def _listing(paths: Sequence[Path], limit: int = 5) -> str:
    """Up to ``limit`` file names, then how many more."""
    if not paths:
        return "none"
    shown = ", ".join(Path(p).name for p in paths[:limit])
    return shown + (f" and {len(paths) - limit} more" if len(paths) > limit else "")
