"""The Iris network, its settings and its weights files."""
from .config import IrisConfig
from .iris import IrisModel

__all__ = ["IrisConfig", "IrisModel"]
