"""Deployment without torch: ``h3de predict EXPORT_DIR`` on an ``h3de export`` folder.

- ``bundle.py``: the export folder (its ``h3de_export.json`` and graphs, run by onnxruntime or TorchScript).
- ``grid.py``: the inference chain's geometry in numpy (the RAS grid, trilinear sampling, padding, patches).
- ``windows.py``: Gaussian-blended sliding windows in numpy.
- ``runtime.py``: :class:`ExportRunner`, the steps of :func:`h3de.inference.detect` on the exported graphs.

With an ONNX export this needs numpy, nibabel, pynrrd, isal, scipy and onnxruntime (plus tqdm and, for QC figures,
matplotlib); nothing here imports torch, MONAI or Lightning.
"""
