"""Methods: one file each, registered by name. Adding a method = one file + one import line here."""

from methods.base import REGISTRY, ImageSet, Method, Task, register
from methods import zero_shot  # noqa: F401  (registers)

__all__ = ["REGISTRY", "ImageSet", "Method", "Task", "register"]
