"""Few-shot CLIP adaptation benchmark: run methods over the CoOp protocol, store runs, report."""

__version__ = "0.1.0"
PROTOCOL_VERSION = "coop-v3"  # v3: the coop sampler keeps short classes whole (Dassl master), v2 padded them
