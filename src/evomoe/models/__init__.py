"""Models, one file each; importing this package registers them in ``evomoe.registry.MODELS``."""

from .base import ModelOutput, MoEModel, RoutingCollector
from .decoder import GPT, Decoder
from .encdec import EncoderDecoder
from .encoder import MaskedLM

__all__ = ["GPT", "Decoder", "EncoderDecoder", "MaskedLM", "ModelOutput", "MoEModel", "RoutingCollector"]
