"""Methods: one file each, registered by name. Adding a method = one file + one import line here."""

from methods.base import REGISTRY, ImageSet, Method, Task, register
from methods import zero_shot  # noqa: F401  (registers)
from methods import clip_lora, block_lora  # noqa: F401  (registers)
from methods import coop, tip_adapter  # noqa: F401  (registers)

__all__ = ["REGISTRY", "ImageSet", "Method", "Task", "register"]
