"""The embedded tiny text-to-image model (32×32 coloured shapes), its data, text encoder and training script.
Cheap to import: diffusers loads only when a model is built."""
from .model import TinyModel, load_tiny

__all__ = ["TinyModel", "load_tiny"]
