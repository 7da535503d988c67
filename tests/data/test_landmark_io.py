import json
import math

import nibabel as nib
import numpy as np
import pytest

from h3de.data.landmark_io import LANDMARK_SUFFIXES, read_landmarks, write_landmarks
from h3de.errors import DataError

NAMES = ["nose", "eye_L", "eye R, upper", "#4", "chin"]  # a comma and a leading '#' must survive every format
POSITIONS = np.array(
    [[1.5, -2.25, 3.0], [np.nan] * 3, [-40.125, 10.0, 0.001], [1 / 3, -2 / 7, 123456.78901234567], [1e-7, -0.0, 5e3]]
)
PRESENT = ~np.isnan(POSITIONS).any(axis=1)
SLICER_COLUMNS = "id,x,y,z,ow,ox,oy,oz,vis,sel,lock,label,desc,associatedNodeID"


def read_text(tmp_path, name: str, text: str, **kwargs):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return read_landmarks(path, **kwargs)


# --- round trips: every writable format gives back the same names and positions, to the bit ---


@pytest.mark.parametrize("suffix", LANDMARK_SUFFIXES)
@pytest.mark.parametrize("presence", [None, np.array([0.9, 0.1, 0.8, 0.7, 0.6])])
def test_round_trip_is_exact_and_keeps_absent_rows(tmp_path, suffix, presence):
    path = tmp_path / f"points{suffix}"
    write_landmarks(path, NAMES, POSITIONS, presence)
    names, positions = read_landmarks(path)
    keep = PRESENT if suffix == ".fcsv" else np.ones(len(NAMES), bool)  # .fcsv has no "absent": left out
    assert names == [n for n, k in zip(NAMES, keep, strict=True) if k]
    np.testing.assert_array_equal(positions, POSITIONS[keep])  # NaN rows equal NaN rows; numbers exact
    assert positions.dtype == np.float64 and positions.shape == (int(keep.sum()), 3)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temp files left


def test_numbered_names_with_presence_survive_the_fcsv_round_trip(tmp_path):
    """Integer labels whose desc holds h3de's presence note are not mistaken for AFIDs-style numbering."""
    path = tmp_path / "numbered.fcsv"
    write_landmarks(path, ["1", "2", "3"], np.arange(9.0).reshape(3, 3), np.array([0.9, 0.8, 0.7]))
    assert read_landmarks(path)[0] == ["1", "2", "3"]


def test_written_files_declare_ras_mm(tmp_path):
    write_landmarks(tmp_path / "p.mrk.json", NAMES, POSITIONS)
    markup = json.loads((tmp_path / "p.mrk.json").read_text())["markups"][0]
    assert markup["coordinateSystem"] == "RAS" and markup["coordinateUnits"] == "mm"
    statuses = [p["positionStatus"] for p in markup["controlPoints"]]
    assert statuses == ["defined", "missing", "defined", "defined", "defined"]
    assert all(math.isfinite(v) for p in markup["controlPoints"] for v in p["position"])
    write_landmarks(tmp_path / "p.csv", NAMES, POSITIONS)
    declared = (tmp_path / "p.csv").read_text().splitlines()[:3]
    assert declared == ["# coordinate_system = RAS", "# units = mm", "name,x,y,z"]
    write_landmarks(tmp_path / "p.fcsv", NAMES, POSITIONS)
    lines = (tmp_path / "p.fcsv").read_text().splitlines()
    assert lines[:3] == [
        "# Markups fiducial file version = 5.0",
        "# CoordinateSystem = RAS",
        f"# columns = {SLICER_COLUMNS}",
    ]
    assert lines[3] == "1,1.5,-2.25,3.0,0,0,0,1,1,1,0,nose,,"
    write_landmarks(tmp_path / "p.json", NAMES, POSITIONS)
    doc = json.loads((tmp_path / "p.json").read_text())
    assert (doc["coordinate_system"], doc["units"], doc["landmarks"][1]["position"]) == ("RAS", "mm", None)


# --- the same physical point, given in LPS or in RAS, reads as the same RAS position ---

RAS_POINT = np.array([12.5, -30.25, 7.0])
LPS_POINT = RAS_POINT * [-1, -1, 1]


def markups_doc(system: str | None, xyz, units=None) -> str:
    markup = {"type": "Fiducial", "controlPoints": [{"label": "p", "position": list(map(float, xyz))}]}
    if system is not None:
        markup["coordinateSystem"] = system
    if units is not None:
        markup["coordinateUnits"] = units
    return json.dumps({"markups": [markup]})


def fcsv_doc(system: str | None, xyz, version="4.11") -> str:
    header = f"# Markups fiducial file version = {version}\n"
    header += "" if system is None else f"# CoordinateSystem = {system}\n"
    row = f"vtkMRMLMarkupsFiducialNode_0,{xyz[0]},{xyz[1]},{xyz[2]},0,0,0,1,1,1,0,p,,"
    return header + f"# columns = {SLICER_COLUMNS}\n{row}\n"


def csv_doc(system: str | None, xyz, units=None) -> str:
    lines = [] if system is None else [f"# coordinate_system = {system}"]
    lines += [] if units is None else [f"# units = {units}"]
    return "\n".join([*lines, "name,x,y,z", f"p,{xyz[0]},{xyz[1]},{xyz[2]}"]) + "\n"


def json_doc(system: str, xyz, units="mm") -> str:
    landmarks = [{"name": "p", "position": list(map(float, xyz))}]
    return json.dumps({"format": "h3de-landmarks", "coordinate_system": system, "units": units, "landmarks": landmarks})


@pytest.mark.parametrize(
    "name, ras_text, lps_text",
    [
        ("a.mrk.json", markups_doc("RAS", RAS_POINT), markups_doc("LPS", LPS_POINT)),
        ("a.mrk.json", markups_doc("ras", RAS_POINT), markups_doc(None, LPS_POINT)),  # Slicer's default is LPS
        ("a.fcsv", fcsv_doc("RAS", RAS_POINT, "5.6"), fcsv_doc("LPS", LPS_POINT, "5.6")),
        ("a.fcsv", fcsv_doc("0", RAS_POINT, "4.6"), fcsv_doc("1", LPS_POINT, "4.6")),
        ("a.fcsv", fcsv_doc(None, RAS_POINT, "4.6"), fcsv_doc("1", LPS_POINT, "4.10")),  # no line: RAS
        ("a.csv", csv_doc("RAS", RAS_POINT), csv_doc("LPS", LPS_POINT)),
        ("a.csv", csv_doc(None, RAS_POINT), csv_doc("lps", LPS_POINT)),  # no declaration: RAS (today's files)
        ("a.json", json_doc("RAS", RAS_POINT), json_doc("LPS", LPS_POINT)),
    ],
)
def test_lps_and_ras_give_the_same_ras_position(tmp_path, name, ras_text, lps_text):
    for label, text in (("ras", ras_text), ("lps", lps_text)):
        names, positions = read_text(tmp_path, f"{label}_{name}", text)
        assert names == ["p"]
        np.testing.assert_array_equal(positions, [RAS_POINT])


@pytest.mark.parametrize(
    "name, text",
    [
        ("m.csv", csv_doc("RAS", RAS_POINT / 1000, "m")),
        ("um.csv", csv_doc("LPS", LPS_POINT * 1000, "um")),
        ("mu.csv", csv_doc(None, RAS_POINT * 1000, "µm")),
        ("m.json", json_doc("RAS", RAS_POINT / 1000, "m")),
        ("um.mrk.json", markups_doc("RAS", RAS_POINT * 1000, "um")),
        ("code.mrk.json", markups_doc("LPS", LPS_POINT, ["mm", "UCUM", "millimeter"])),
    ],
)
def test_units_are_converted_to_mm(tmp_path, name, text):
    np.testing.assert_allclose(read_text(tmp_path, name, text)[1], [RAS_POINT], rtol=1e-12)


# --- .fcsv: Slicer 4.x and 5.x files, column order, names from label or desc ---


@pytest.mark.parametrize(
    "text",
    [
        "# Markups fiducial file version = 4.6\n# CoordinateSystem = 0\n"
        f"# columns = {SLICER_COLUMNS}\n"
        "vtkMRMLMarkupsFiducialNode_0,12.5,-30.25,7,0,0,0,1,1,1,0,p,,vtkMRMLScalarVolumeNode1\n",
        "# Markups fiducial file version = 4.10\n# CoordinateSystem = 0\n"
        f"# columns = {SLICER_COLUMNS}\n"
        "vtkMRMLMarkupsFiducialNode_0,12.500,-30.250,7.000,0.000,0.000,0.000,1.000,1,1,0,p,,\n",
        "# Markups fiducial file version = 5.6\n# CoordinateSystem = LPS\n"
        f"# columns = {SLICER_COLUMNS}\n"
        "1,-12.5,30.25,7.0,0,0,0,1,1,1,1,p, , ,,\n",  # a desc of one space, two unlabelled extra columns
        "# Markups fiducial file version = 5.0\r\n# CoordinateSystem = RAS\r\n"  # Windows line ends
        f"# columns = {SLICER_COLUMNS}\r\n\r\n"
        '1,12.5,-30.25,7.0,0,0,0,1,1,1,0,p,"presence 0.5000",\r\n',
        "# columns = label,z,x,y\np,7,12.5,-30.25\n",  # the columns line's order is followed
    ],
    ids=["v4.6", "v4.10", "v5.6-lps", "v5.0-crlf", "reordered"],
)
def test_fcsv_header_variants(tmp_path, text):
    names, positions = read_text(tmp_path, "a.fcsv", text)
    assert names == ["p"]
    np.testing.assert_array_equal(positions, [RAS_POINT])


def afids_text(descs) -> str:
    rows = [
        f"vtkMRMLMarkupsFiducialNode_{i},{i}.5,-{i},2,0,0,0,1,1,1,0,{i},{desc},vtkMRMLScalarVolumeNode1"
        for i, desc in enumerate(descs, start=1)
    ]
    return f"# Markups fiducial file version = 4.6\n# CoordinateSystem = 0\n# columns = {SLICER_COLUMNS}\n" + "\n".join(
        rows
    )


@pytest.mark.parametrize(
    "descs, expected",
    [
        (["AC", "PC", "infracollicular sulcus"], ["AC", "PC", "infracollicular sulcus"]),  # AFIDs: names in desc
        (["AC", "AC", "PC"], ["1", "2", "3"]),  # repeated descs are not names
        (["AC", "", "PC"], ["1", "2", "3"]),  # nor are descs some points lack
    ],
)
def test_fcsv_names_from_label_or_desc(tmp_path, descs, expected):
    names, positions = read_text(tmp_path, "afids.fcsv", afids_text(descs))
    assert names == expected
    np.testing.assert_array_equal(positions[1], [2.5, -2.0, 2.0])


def test_fcsv_empty_label_falls_back_to_desc(tmp_path):
    text = f"# columns = {SLICER_COLUMNS}\n0,1,2,3,0,0,0,1,1,1,0,,from_desc,\n1,4,5,6,0,0,0,1,1,1,0,from_label,x,\n"
    assert read_text(tmp_path, "a.fcsv", text)[0] == ["from_desc", "from_label"]


# --- .npy voxel indices: only with their image ---


def write_image(path, affine, shape=(4, 6, 3)):
    nib.save(nib.Nifti1Image(np.zeros(shape, np.float32), affine), path)
    return path


def test_npy_voxel_indices_map_through_the_image_affine(tmp_path):
    affine = np.array(  # permuted and flipped: i -> -y (2 mm), j -> +z (3 mm), k -> -x (1.5 mm)
        [[0.0, 0.0, -1.5, 10.0], [-2.0, 0.0, 0.0, 20.0], [0.0, 3.0, 0.0, -5.0], [0.0, 0.0, 0.0, 1.0]]
    )
    image = write_image(tmp_path / "scan.nii.gz", affine)
    indices = np.array([[2.0, 5.0, 1.0], [np.nan, 1.0, 1.0], [-1000.0, -1000.0, -1000.0], [0.0, 0.5, -1.0], [3, 0, 2]])
    path = tmp_path / "points.npy"
    np.save(path, indices)
    names, world = read_landmarks(path, image=image)
    assert names == ["L0", "L1", "L2", "L3", "L4"]
    by_hand = [[10.0 - 1.5 * 1, 20.0 - 2.0 * 2, -5.0 + 3.0 * 5], [10.0 - 1.5 * 2, 20.0 - 2.0 * 3, -5.0 + 0.0]]
    np.testing.assert_allclose(world[[0, 4]], by_hand, atol=1e-12)
    assert np.isnan(world[1:4]).all()  # NaN, the MML's -1000 and any negative index: absent
    np.save(path, indices.astype(np.float32)[[0, 4]])
    named, same = read_landmarks(path, image=image, names=["a", "b"])
    assert named == ["a", "b"] and np.allclose(same, by_hand)


def test_npy_needs_its_image_and_fitting_indices(tmp_path):
    image = write_image(tmp_path / "scan.nii.gz", np.eye(4))
    path = tmp_path / "points.npy"
    np.save(path, np.array([[1.0, 2.0, 1.0], [3.0, 5.0, 2.0]]))
    with pytest.raises(DataError, match="needs? the image") as info:
        read_landmarks(path)
    assert str(path) in str(info.value)
    with pytest.raises(DataError, match="2 rows of voxel indices but 1 names"):
        read_landmarks(path, image=image, names=["a"])
    np.save(path, np.array([[1.0, 2.0, 1.0], [3.0, 6.0, 2.0]]))  # j = 6 lies beyond the 6 voxels of axis 1
    with pytest.raises(DataError, match=r"row 1 \(L1\) at voxel \[3.0, 6.0, 2.0\] lies outside .* \(4, 6, 3\)"):
        read_landmarks(path, image=image)
    np.save(path, np.zeros((3, 2)))
    with pytest.raises(DataError, match=r"expected an \(L, 3\) array of voxel indices, got shape \(3, 2\)"):
        read_landmarks(path, image=image)


# --- bad input: one DataError naming the file and the problem ---

GOOD_FCSV_HEADER = f"# Markups fiducial file version = 5.0\n# CoordinateSystem = RAS\n# columns = {SLICER_COLUMNS}\n"


@pytest.mark.parametrize(
    "name, text, fragment",
    [
        ("a.mrk.json", "{not json", "not valid JSON"),
        ("a.mrk.json", '{"markups": []}', "no 'markups' list"),
        ("a.mrk.json", '{"markups": [{"controlPoints": [{"label": "x", "position": [1, 2]}]}]}', "'x' has no valid"),
        ("a.mrk.json", markups_doc("XYZ", RAS_POINT), "unknown coordinateSystem 'XYZ'"),
        ("a.mrk.json", markups_doc("RAS", RAS_POINT, "cm"), "unknown coordinateUnits 'cm'"),
        ("a.mrk.json", "  \n", "the file is empty"),
        ("a.csv", "label,a,b,c\n", "the header lacks the column(s) name, x, y, z"),
        ("a.csv", "name,x,y\nnose,1,2\n", "the header lacks the column(s) z"),
        ("a.csv", "name,x,y,z,x\nnose,1,2,3,4\n", "the header repeats the column(s) x"),
        ("a.csv", "name,x,y,z\nnose,1,2\n", "line 2: expected 4 columns"),
        ("a.csv", "name,x,y,z\nnose,1,abc,3\n", "line 2: coordinate 'abc' is not a number"),
        ("a.csv", "name,x,y,z\nnose,1,nan,3\n", "line 2: coordinates ['1', 'nan', '3'] are partly missing"),
        ("a.csv", "name,x,y,z\nnose,1,2,inf\n", "are partly missing or infinite"),
        ("a.csv", "name,x,y,z\nnose,1,2,3\nnose,4,5,6\n", "'nose' appears twice (duplicate landmark name)"),
        ("a.csv", "name,x,y,z\n,1,2,3\n", "a landmark has an empty name"),
        ("a.csv", "name,x,y,z\n", "no landmarks"),
        ("a.csv", "", "the file is empty"),
        ("a.csv", "# units = mm\n", "no header line"),
        ("a.csv", csv_doc("XYZ", RAS_POINT), "unknown coordinate_system 'XYZ' (expected RAS or LPS)"),
        ("a.csv", csv_doc("RAS", RAS_POINT, "furlong"), "unknown units 'furlong' (expected mm, m or um)"),
        ("a.csv", "# coordinate_sytem = LPS\nname,x,y,z\np,1,2,3\n", "line 1: unknown declaration 'coordinate_sytem'"),
        ("a.csv", "# units = mm\n# units = m\nname,x,y,z\np,1,2,3\n", "line 2: 'units' is declared twice"),
        ("a.fcsv", fcsv_doc("2", RAS_POINT), "unknown CoordinateSystem '2' (expected RAS or LPS)"),
        ("a.fcsv", "# columns = id,x,y,label\n0,1,2,p\n", "the '# columns =' line lacks the column(s) z"),
        ("a.fcsv", "# columns = id,x,y,z\n0,1,2,3\n", "lacks the column(s) label"),
        ("a.fcsv", GOOD_FCSV_HEADER + "1,1,2\n", "point 1 has 3 columns, too few"),
        ("a.fcsv", GOOD_FCSV_HEADER + "1,1,abc,3,0,0,0,1,1,1,0,p,,\n", "point 1: coordinate 'abc' is not a number"),
        ("a.fcsv", GOOD_FCSV_HEADER + "1,1,2,3,0,0,0,1,1,1,0,p,,\n2,1,2,3,0,0,0,1,1,1,0,p,,\n", "'p' appears twice"),
        ("a.fcsv", GOOD_FCSV_HEADER, "no landmarks"),
        ("a.fcsv", "", "the file is empty"),
        ("a.json", json_doc("XYZ", RAS_POINT), "unknown coordinate_system 'XYZ'"),
        ("a.json", json_doc("RAS", RAS_POINT, "inch"), "unknown units 'inch'"),
        ("a.json", '{"format": "h3de-landmarks", "coordinate_system": "RAS", "landmarks": []}', "'units' is missing"),
        ("a.json", '{"format": "h3de-landmarks", "version": 2}', "version 2 is not supported"),
        ("a.json", '{"landmarks": []}', "not an h3de landmark file"),
        ("a.txt", "", "unsupported landmark file type"),
    ],
)
def test_bad_files_name_the_file_and_the_problem(tmp_path, name, text, fragment):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(DataError) as info:
        read_landmarks(path)
    message = str(info.value)
    assert message.startswith(f"{path}:") and fragment in message and "\n" not in message


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="not found"):
        read_landmarks(tmp_path / "nothing.csv")


def test_excel_byte_order_mark_and_free_text_comments_are_read(tmp_path):
    path = tmp_path / "excel.csv"
    path.write_bytes("# exported from a spreadsheet\n\nname,x,y,z\np,12.5,-30.25,7\n".encode("utf-8-sig"))
    names, positions = read_landmarks(path)
    assert names == ["p"] and np.array_equal(positions, [RAS_POINT])


def test_caller_mistakes_are_value_errors(tmp_path):
    with pytest.raises(ValueError, match="names= is only for .npy files"):
        read_text(tmp_path, "a.csv", csv_doc(None, RAS_POINT), names=["p"])
    with pytest.raises(ValueError, match="non-empty and distinct"):
        write_landmarks(tmp_path / "a.csv", ["p", "p"], np.zeros((2, 3)))
    with pytest.raises(DataError, match="unsupported landmark file type"):
        write_landmarks(tmp_path / "a.npy", ["p"], np.zeros((1, 3)))  # voxel files are read only


# --- Slicer files holding several markups ---


def _point_list(name: str, system: str, points: dict, kind: str = "Fiducial") -> dict:
    controls = [{"label": label, "position": list(xyz)} for label, xyz in points.items()]
    return {"type": kind, "name": name, "coordinateSystem": system, "controlPoints": controls}


def test_markups_of_several_point_lists_are_merged_in_file_order_each_in_its_own_system(tmp_path):
    doc = {
        "markups": [
            _point_list("skull", "RAS", {"nasion": (1.0, 2.0, 3.0)}),
            _point_list("ruler", "RAS", {"L-1": (9.0, 9.0, 9.0), "L-2": (8.0, 8.0, 8.0)}, kind="Line"),
            _point_list("jaw", "LPS", {"menton": (4.0, 5.0, 6.0), "gonion_L": (-7.0, 8.0, 9.0)}),
        ]
    }
    names, positions = read_text(tmp_path, "a.mrk.json", json.dumps(doc))
    assert names == ["nasion", "menton", "gonion_L"]  # the Line's handles are not landmarks
    np.testing.assert_array_equal(positions, [[1.0, 2.0, 3.0], [-4.0, -5.0, 6.0], [7.0, -8.0, 9.0]])


def test_markups_name_in_two_point_lists_or_no_point_list_is_refused(tmp_path):
    twice = {"markups": [_point_list("a", "RAS", {"p": (1, 2, 3)}), _point_list("b", "LPS", {"p": (1, 2, 3)})]}
    with pytest.raises(
        DataError, match=r"a.mrk.json: landmark 'p' is in two point lists \(markup 1 'a' and markup 2 'b'\)"
    ):
        read_text(tmp_path, "a.mrk.json", json.dumps(twice))
    lines = {"markups": [_point_list("r", "RAS", {"L-1": (1, 2, 3)}, kind="Line"), {"type": "ROI"}]}
    with pytest.raises(
        DataError, match=r"b.mrk.json: no point list \(markup of type 'Fiducial'\) among its markups \(Line, ROI\)"
    ):
        read_text(tmp_path, "b.mrk.json", json.dumps(lines))
