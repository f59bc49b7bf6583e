"""Tasks, one file each; importing this package registers them in ``evomoe.registry.TASKS``."""

from . import lm, mlm, mt  # noqa: F401
