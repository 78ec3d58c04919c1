"""Errors raised by the guidance core; each names the file, line or tensor at fault."""

from ..core.errors import MergeDagError


class GuidanceError(MergeDagError):
    """Statistics, allocations or coefficients cannot be computed from the given inputs."""


class CalibrationError(GuidanceError):
    """A calibration file is malformed (bad JSON, a row without a non-empty "text" string)."""
