"""Methods: one file each, registered by name. Adding a method = one file + one import line here."""
# ruff: noqa: I001  (registration order is the listing order)

from methods.base import REGISTRY, ImageSet, Method, Task, register
from methods import zero_shot, coop, tip_adapter, clip_lora, block_lora  # noqa: F401  (registers)
from methods import clip_adapter, taskres, lp_pp, clap  # noqa: F401
from methods import cocoop, kgcoop, prograd, maple, plot_pp, promptsrc, mmrl  # noqa: F401
from methods import gda, prolip, clip_svd, two_sfs  # noqa: F401

__all__ = ["REGISTRY", "ImageSet", "Method", "Task", "register"]
