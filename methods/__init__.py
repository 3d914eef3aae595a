"""Methods: one file each, registered by name. Adding a method = one file + one import line here."""
# ruff: noqa: I001  (registration order is the listing order)

from methods.base import REGISTRY, ImageSet, Method, Task, register
from methods import zero_shot, coop, tip_adapter, clip_lora, block_lora  # noqa: F401  (registers)
from methods import clip_adapter, taskres, lp_pp, clap  # noqa: E402,F401

__all__ = ["REGISTRY", "ImageSet", "Method", "Task", "register"]
from methods import cocoop, kgcoop, prograd, maple, plot_pp  # noqa: E402,F401
from methods import gda  # noqa: E402,F401
from methods import prolip  # noqa: E402,F401
from methods import clip_svd  # noqa: E402,F401
from methods import two_sfs  # noqa: E402,F401
