"""Models, one file each; importing this package registers them in ``evomoe.registry.MODELS``."""

from .base import ModelOutput, MoEModel, RoutingCollector
from .decoder import GPT, Decoder

__all__ = ["GPT", "Decoder", "ModelOutput", "MoEModel", "RoutingCollector"]
