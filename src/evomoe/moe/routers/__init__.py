"""Routers, one file each; importing this package registers them in ``evomoe.registry.ROUTERS``.

Adding a router: a new module here with a ``Router`` subclass decorated ``@ROUTERS.register(name)``, and
its import below. The router contract tests (tests/moe/test_router_contract.py) then cover it.
"""

from . import (  # noqa: F401
    act_dts,
    base_layers,
    blockffn,
    comet,
    dselect_k,
    dts,
    dts_plus,
    hash,
    remoe,
    sigma,
    soft,
    stablemoe,
    stat_topk,
    topk,
)
