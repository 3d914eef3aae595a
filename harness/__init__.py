"""Few-shot CLIP adaptation benchmark: run methods over the CoOp protocol, store runs, report."""

__version__ = "0.1.0"
PROTOCOL_VERSION = "coop-v2"
