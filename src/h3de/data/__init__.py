"""Datasets: manifest, landmark files, the phantom generator, transforms and the DataModule."""
