"""ctssl: self-supervised pretraining for 3D CT segmentation, measured under label scarcity."""

__version__ = "0.1.0"
