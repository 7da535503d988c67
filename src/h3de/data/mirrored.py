"""Left/right landmark pairs: detected from the names, or given as ``A:B,C:D``.

A left/right flip of the image swaps the labels of a mirrored pair (``mirrored_pairs`` in the manifest).
:func:`detect_mirrored_pairs` finds pairs by the naming conventions below; a name is paired only when its
counterpart is also a landmark, and only when each of the two has no other candidate (a name that could
pair with two others is reported as ambiguous and left unpaired). The rules, tried on every name:

1. Side words: a whole word ``L``/``R``, ``l``/``r``, ``Lt``/``Rt``, ``lt``/``rt``, ``Left``/``Right``,
   ``left``/``right`` or ``LEFT``/``RIGHT`` between separators (``_``, ``-``, ``.``, space), wherever it
   is: ``orbit_L``/``orbit_R``, ``L_orbit``, ``Po-L``, ``left ear``, AFIDs' ``R superior LMS``.
2. Camel case: ``Left``/``Right`` starting a name before an upper-case letter or digit (``LeftEye``) or
   ending it after a lower-case letter or digit (``eyeLeft``); ``left``/``right`` starting it before an
   upper-case letter (``leftEye``).
3. A glued side letter: ``L``/``R`` starting a name before an upper-case letter (acronyms like ``LAMTP``/
   ``RAMTP``, ``LV``/``RV``), or ending it after a lower-case letter (cephalometric ``GoL``/``GoR``).

Rule 3 can pair two unrelated acronyms that differ only in a leading L/R; the import prints every pair it
found, and ``--mirrored A:B,...`` or ``--mirrored none`` overrides the detection.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Sequence

__all__ = ["detect_mirrored_pairs", "parse_mirrored_pairs"]

_SIDE_WORDS = {
    "L": ("R", "L"),
    "R": ("L", "R"),
    "l": ("r", "L"),
    "r": ("l", "R"),
    "Lt": ("Rt", "L"),
    "Rt": ("Lt", "R"),
    "lt": ("rt", "L"),
    "rt": ("lt", "R"),
    "Left": ("Right", "L"),
    "Right": ("Left", "R"),
    "left": ("right", "L"),
    "right": ("left", "R"),
    "LEFT": ("RIGHT", "L"),
    "RIGHT": ("LEFT", "R"),
}  # word -> (its mirror, the side it names)
_SEPARATORS = re.compile(r"([_\-. ]+)")
_GLUED = (  # rules 2 and 3: a side word glued to the rest of the name
    re.compile(r"^(Left|Right)(?=[A-Z0-9])"),
    re.compile(r"(?<=[a-z0-9])(Left|Right)$"),
    re.compile(r"^(left|right)(?=[A-Z])"),
    re.compile(r"^([LR])(?=[A-Z])"),
    re.compile(r"(?<=[a-z])([LR])$"),
)


def _candidates(name: str) -> dict[str, str]:
    """Mirror candidates of ``name`` by each rule -> the side ``name`` is on ("L", "R" or "" when mixed)."""
    found: dict[str, str] = {}
    parts = _SEPARATORS.split(name)  # words at even indices, separators at odd ones
    sides = {_SIDE_WORDS[w][1] for w in parts[::2] if w in _SIDE_WORDS}
    if sides:
        words = [_SIDE_WORDS[p][0] if i % 2 == 0 and p in _SIDE_WORDS else p for i, p in enumerate(parts)]
        found["".join(words)] = sides.pop() if len(sides) == 1 else ""
    for pattern in _GLUED:
        match = pattern.search(name)
        if match:
            mirror, side = _SIDE_WORDS[match.group(1)]
            found.setdefault(name[: match.start()] + mirror + name[match.end() :], side)
    found.pop(name, None)
    return found


def detect_mirrored_pairs(names: Sequence[str]) -> tuple[tuple[tuple[str, str], ...], tuple[str, ...]]:
    """Left/right pairs among ``names`` by the rules of this module.

    Args:
        names: landmark names.

    Returns:
        ``(pairs, ambiguous)``: pairs as (left name, right name) in the order of their first name in ``names``
        (as found when a name's side is unclear), and the names with more than one candidate partner, left
        unpaired.
    """
    known = set(names)
    partners: dict[str, dict[str, str]] = {n: {} for n in names}
    for name in names:
        for other, side in _candidates(name).items():
            if other in known:
                partners[name][other] = side
                partners[other].setdefault(name, {"L": "R", "R": "L"}.get(side, ""))
    ambiguous = tuple(n for n in names if len(partners[n]) > 1)
    pairs, paired = [], set()
    for name in names:
        if name in paired or len(partners[name]) != 1:
            continue
        ((other, side),) = partners[name].items()
        if len(partners[other]) != 1:
            continue
        pairs.append((other, name) if side == "R" else (name, other))
        paired.update((name, other))
    return tuple(pairs), ambiguous


def parse_mirrored_pairs(spec: str, names: Sequence[str]) -> tuple[tuple[str, str], ...]:
    """Pairs of ``spec`` (``A:B,C:D``, landmark names of ``names``), in the given order.

    Raises:
        ValueError: an item that is not two names joined by ``:``, a name that is not a landmark (with the
            closest names), a pair of one name twice, or a name in two pairs.
    """
    items = [item.strip() for item in spec.split(",")]
    pairs, seen = [], set()
    for item in items:
        sides = [s.strip() for s in item.split(":")]
        if len(sides) != 2 or not all(sides):
            raise ValueError(f"--mirrored item {item!r} is not two landmark names joined by ':' (like orbit_L:orbit_R)")
        for side in sides:
            if side not in names:
                close = difflib.get_close_matches(side, list(names), n=3)
                hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
                raise ValueError(f"--mirrored names {side!r}, which is not a landmark of the dataset{hint}")
        if sides[0] == sides[1]:
            raise ValueError(f"--mirrored item {item!r} pairs a landmark with itself")
        for side in sides:
            if side in seen:
                raise ValueError(f"--mirrored names {side!r} in more than one pair")
            seen.add(side)
        pairs.append((sides[0], sides[1]))
    return tuple(pairs)
