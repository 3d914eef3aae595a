"""User-facing errors: the CLI turns these into a one-paragraph message and exit code 2."""


class HarnessError(Exception):
    """Bad usage or bad input. The message names the problem and the fix."""


class DataError(HarnessError):
    """A dataset on disk is missing, incomplete or unreadable."""


class DivergedError(RuntimeError):
    """Training produced a non-finite loss; the run is stored as failed, the sweep goes on."""
