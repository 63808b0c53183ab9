"""monarch-k8s-crd."""

__version__ = "0.1.0"
