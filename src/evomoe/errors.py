"""Errors of the command-line layer (cli, compare, sweep) that are neither config nor training errors."""

from __future__ import annotations


class CLIError(RuntimeError):
    """A command cannot go on (an --out that holds another run, an interrupted comparison, ...)."""
