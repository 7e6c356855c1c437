"""gradwise: optimization methods for large-scale machine learning, on PyTorch."""

__version__ = "0.1.0"
