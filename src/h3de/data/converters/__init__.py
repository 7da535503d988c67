"""Converters from public 3D landmark benchmarks to an h3de manifest (``h3de data convert KIND SRC --out DIR``).

Each converter reads a dataset in the layout it ships in, never changes or copies its files, and writes
``dataset.json`` and ``landmarks/<case>.json`` (RAS mm) under the output folder through
:func:`h3de.data.importer.write_dataset`, with the same checks and report as ``h3de data import``.
"""

from h3de.data.converters.afids import convert_afids
from h3de.data.converters.mml import convert_mml
from h3de.data.converters.verse import convert_verse

__all__ = ["CONVERTERS", "convert_afids", "convert_mml", "convert_verse"]

CONVERTERS = {"mml": convert_mml, "afids": convert_afids, "verse": convert_verse}
