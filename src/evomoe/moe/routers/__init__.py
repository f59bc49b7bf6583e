"""Routers; importing this package registers them in ``evomoe.registry.ROUTERS``."""

from . import dts, soft, topk  # noqa: F401

try:  # baseline routers (BASE, hash, StableMoE) live in their own modules when present
    from . import base, hash, stablemoe  # noqa: F401
except ImportError:  # pragma: no cover
    pass
