import json
import math

import numpy as np
import pytest

from h3de.data.landmark_io import read_landmarks, write_landmarks
from h3de.errors import DataError

NAMES = ["nose", "eye_L", "eye_R"]
POSITIONS = np.array([[1.5, -2.25, 3.0], [np.nan] * 3, [-40.125, 10.0, 0.001]])


@pytest.mark.parametrize("suffix", [".mrk.json", ".csv"])
def test_round_trip_keeps_positions_and_missing(tmp_path, suffix):
    path = tmp_path / f"points{suffix}"
    write_landmarks(path, NAMES, POSITIONS)
    names, positions = read_landmarks(path)
    assert names == NAMES
    np.testing.assert_array_equal(np.isnan(positions), np.isnan(POSITIONS))
    np.testing.assert_allclose(positions[[0, 2]], POSITIONS[[0, 2]], atol=1e-12)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temp files left


def test_markups_in_lps_are_converted_to_ras(tmp_path):
    doc = {
        "markups": [
            {
                "type": "Fiducial",
                "coordinateSystem": "LPS",
                "controlPoints": [
                    {"label": "a", "position": [10.0, 20.0, 30.0], "positionStatus": "defined"},
                    {"label": "b", "position": [0.0, 0.0, 0.0], "positionStatus": "missing"},
                ],
            }
        ]
    }
    path = tmp_path / "lps.mrk.json"
    path.write_text(json.dumps(doc))
    names, positions = read_landmarks(path)
    assert names == ["a", "b"]
    np.testing.assert_allclose(positions[0], [-10.0, -20.0, 30.0])
    assert np.isnan(positions[1]).all()


def test_written_markups_are_slicer_ras_with_missing_status(tmp_path):
    path = tmp_path / "p.mrk.json"
    write_landmarks(path, NAMES, POSITIONS)
    markup = json.loads(path.read_text())["markups"][0]
    assert markup["coordinateSystem"] == "RAS" and markup["coordinateUnits"] == "mm"
    assert [p["positionStatus"] for p in markup["controlPoints"]] == ["defined", "missing", "defined"]
    assert all(math.isfinite(v) for p in markup["controlPoints"] for v in p["position"])


@pytest.mark.parametrize(
    "name, text, fragment",
    [
        ("a.mrk.json", "{not json", "not valid JSON"),
        ("a.mrk.json", '{"markups": []}', "no 'markups' list"),
        (
            "a.mrk.json",
            '{"markups": [{"controlPoints": [{"label": "x", "position": [1, 2]}]}]}',
            "'x' has no valid",
        ),
        ("a.mrk.json", '{"markups": [{"coordinateSystem": "XYZ", "controlPoints": []}]}', "coordinateSystem"),
        ("a.csv", "label,a,b,c\n", "header"),
        ("a.csv", "name,x,y,z\nnose,1,2\n", ":2: expected 4 columns"),
        ("a.csv", "name,x,y,z\nnose,1,two,3\n", ":2: coordinates"),
        ("a.csv", "name,x,y,z\nnose,1,2,3\nnose,4,5,6\n", "'nose' appears twice"),
        ("a.csv", "name,x,y,z\n", "no landmarks"),
        ("a.txt", "", "unsupported landmark file type"),
    ],
)
def test_malformed_files_name_the_file_and_problem(tmp_path, name, text, fragment):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(DataError) as info:
        read_landmarks(path)
    assert str(path) in str(info.value) and fragment in str(info.value)


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="not found"):
        read_landmarks(tmp_path / "nothing.csv")
