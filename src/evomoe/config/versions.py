"""Config schema versions and the migrations between them.

Every ``config.toml`` a run writes and every checkpoint's trainer state carry ``schema``. A saved config
of an older version is migrated step by step to the current one (renamed and removed fields), so old run
directories still ``eval`` and ``--resume``; a newer version than this release knows is a clear error.

Versions:
1. the first release (no ``schema`` key). Its files may still hold ``router.soft.balance_weight``, a field
   removed before versions were recorded.
2. plug-in layout: ``schema``, ``task.name`` and ``model.name`` added (their defaults reproduce version 1).
   Fields added later within version 2, each with a default that reproduces the behaviour before it, so
   they need no migration: ``train.max_flops``, ``train.optimizer_impl``, ``train.expert_lr_scale``,
   ``gate.clock``,
   ``gate.decay_until``, ``gate.hard_at``, ``evolve.zero_sum_noise``, the ``[eval]`` section
   (``eval.router``), the ``split`` spawn mode and the ``[router.dts_plus]`` table.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

from .errors import ConfigError
from .schema import SCHEMA_VERSION


def _v1_to_v2(data: dict[str, Any]) -> dict[str, Any]:
    soft = data.get("router", {}).get("soft")
    if isinstance(soft, dict):
        soft.pop("balance_weight", None)  # unused and removed in 0.1.0
        if not soft:
            data["router"].pop("soft")
    return data


MIGRATIONS: dict[int, Callable[[dict[str, Any]], dict[str, Any]]] = {1: _v1_to_v2}


def migrate(data: dict[str, Any], origin: str, assume_first: bool) -> dict[str, Any]:
    """``data`` (a config as a dict) in the current schema. ``assume_first``: no ``schema`` key means
    version 1 (a saved run config); otherwise it means the current version (presets, hand-written files)."""
    data = copy.deepcopy(data)
    version = data.pop("schema", 1 if assume_first else SCHEMA_VERSION)
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ConfigError(f"{origin}: schema = {version!r} is not a config schema version (1, 2, ...)")
    if version > SCHEMA_VERSION:
        raise ConfigError(
            f"{origin}: schema = {version} is newer than this release understands ({SCHEMA_VERSION}): "
            "upgrade evomoe to read it"
        )
    while version < SCHEMA_VERSION:
        data = MIGRATIONS[version](data)
        version += 1
    return data
