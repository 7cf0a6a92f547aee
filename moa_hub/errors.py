"""One error hierarchy. Every message says what was wrong (with the value) and what to do next."""

from __future__ import annotations


class MoaHubError(Exception):
    """Base of every error moa-hub raises on purpose; the CLI prints it without a traceback."""


class PlanError(MoaHubError, ValueError):
    """A plan is malformed or does not fit the model."""


class ModelError(MoaHubError, ValueError):
    """The model folder or checkpoint cannot be converted (architecture, weights format)."""


class ExportError(MoaHubError):
    """The output folder cannot be written."""


class CalibrationError(MoaHubError):
    """The calibration data cannot be built or read."""


class ProfileError(MoaHubError):
    """Profiling the attention influence failed."""


class OptimizeError(MoaHubError):
    """The plan search has no solution or bad inputs."""


class HubError(MoaHubError):
    """A Hub operation (resolve, push) failed."""
