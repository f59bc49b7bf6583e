"""Routers, one file each; importing this package registers them in ``evomoe.registry.ROUTERS``.

Adding a router: a new module here with a ``Router`` subclass decorated ``@ROUTERS.register(name)``, and
its import below. The router contract tests (tests/moe/test_router_contract.py) then cover it.
"""

from . import base_layers, dts, hash, soft, stablemoe, topk  # noqa: F401
