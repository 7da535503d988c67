"""Left/right pairs detected from landmark names, and the ``--mirrored A:B,...`` list."""

from __future__ import annotations

import pytest

from h3de.data.mirrored import detect_mirrored_pairs, parse_mirrored_pairs


@pytest.mark.parametrize(
    ("names", "pairs"),
    [
        (["orbit_L", "nose", "orbit_R"], [("orbit_L", "orbit_R")]),  # side word at the end
        (["R_ear", "L_ear"], [("L_ear", "R_ear")]),  # at the start; left first
        (["Po-L", "Po-R", "Or.l", "Or.r"], [("Po-L", "Po-R"), ("Or.l", "Or.r")]),
        (["left ear", "right ear", "Left Eye", "Right Eye"], [("left ear", "right ear"), ("Left Eye", "Right Eye")]),
        (
            ["condyle_LEFT", "condyle_RIGHT", "gonion_lt", "gonion_rt"],
            [("condyle_LEFT", "condyle_RIGHT"), ("gonion_lt", "gonion_rt")],
        ),
        (["AC", "R superior LMS", "L superior LMS", "PC"], [("L superior LMS", "R superior LMS")]),  # AFIDs
        (
            ["LeftEye", "RightEye", "eyeballLeft", "eyeballRight"],
            [("LeftEye", "RightEye"), ("eyeballLeft", "eyeballRight")],
        ),
        (["leftOrbit", "rightOrbit"], [("leftOrbit", "rightOrbit")]),
        (["RAMTP", "LAMTP", "LV", "RV"], [("LAMTP", "RAMTP"), ("LV", "RV")]),  # glued acronyms
        (["GoR", "GoL", "Me"], [("GoL", "GoR")]),  # cephalometric suffix
        (["a_L_upper", "a_R_upper", "b_L_to_R", "b_R_to_L"], [("a_L_upper", "a_R_upper"), ("b_L_to_R", "b_R_to_L")]),
    ],
)
def test_pairs_are_detected_in_each_naming_style(names, pairs):
    found, ambiguous = detect_mirrored_pairs(names)
    assert sorted(found) == sorted(pairs)
    assert ambiguous == ()


@pytest.mark.parametrize(
    "names",
    [
        ["orbit_L", "ear_R"],  # no counterpart
        ["Rhinion", "Lhinion"],  # a lower-case letter after a leading L/R: a word, not a glued side letter
        ["Lower", "Rower"],
        ["lateral", "rateral"],
        ["L1", "R1"],  # a digit after a leading L/R
        ["ML", "MR"],  # a trailing L/R needs a lower-case letter before it
        ["CL1", "CR1"],
        ["leftmost", "rightmost"],  # words that merely start with left/right
    ],
)
def test_no_false_pairs(names):
    assert detect_mirrored_pairs(names) == ((), ())


def test_a_name_with_two_candidates_is_ambiguous_and_left_unpaired():
    names = ["LMS_L", "LMS_R", "RMS_L"]  # LMS_L mirrors to LMS_R (side word) and to RMS_L (glued letter)
    pairs, ambiguous = detect_mirrored_pairs(names)
    assert ambiguous == ("LMS_L",)
    assert pairs == ()


def test_parse_gives_the_pairs_in_order():
    names = ["a_L", "a_R", "b1", "b2"]
    assert parse_mirrored_pairs("a_L:a_R, b2:b1", names) == (("a_L", "a_R"), ("b2", "b1"))


@pytest.mark.parametrize(
    ("spec", "fragment"),
    [
        ("a_L", "joined by ':'"),
        ("a_L:a_R:b1", "joined by ':'"),
        ("a_L:", "joined by ':'"),
        ("", "joined by ':'"),
        ("a_L:a_Y", "'a_Y', which is not a landmark of the dataset; did you mean 'a_R', 'a_L'?"),
        ("a_L:a_L", "with itself"),
        ("a_L:a_R,a_R:b1", "'a_R' in more than one pair"),
    ],
)
def test_parse_errors_name_the_item(spec, fragment):
    with pytest.raises(ValueError, match="--mirrored") as error:
        parse_mirrored_pairs(spec, ["a_L", "a_R", "b1", "b2"])
    assert fragment in str(error.value)
