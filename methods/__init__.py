"""Methods: one file each, registered by name. Adding a method = one file + one import line here."""

from methods import (  # noqa: F401  (registers)  # noqa: F401  (registers)
    block_lora,
    clip_lora,
    coop,
    tip_adapter,
    zero_shot,  # noqa: F401  (registers)
)
from methods.base import REGISTRY, ImageSet, Method, Task, register

__all__ = ["REGISTRY", "ImageSet", "Method", "Task", "register"]
