"""h3de: a PyTorch Lightning framework for 3D anatomical landmark detection (H3DE-Net)."""

__version__ = "0.1.0"
