"""Config errors and the two checks every validator uses; errors name the field and the bad value."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


class ConfigError(ValueError):
    """A config value is unknown, of the wrong type, or impossible. The message names the field."""


def check(cond: bool, field_: str, value: Any, why: str) -> None:
    if not cond:
        raise ConfigError(f"{field_} = {value!r}: {why}")


def choice(field_: str, value: str, choices: Sequence[str]) -> None:
    check(value in choices, field_, value, f"choose from: {', '.join(choices)}")
