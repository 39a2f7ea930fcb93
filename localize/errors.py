"""User-facing errors. Every error localize raises on bad input is a LocalizeError."""

__all__ = [
    "LocalizeError",
    "TraceError",
    "PlanError",
    "ConfigError",
    "VerificationError",
    "TargetError",
    "InputError",
]


class LocalizeError(Exception):
    """Base class of every user-facing localize error: the message says what is wrong and what to do."""


class TraceError(LocalizeError):
    """The model could not be captured as a graph (neither torch.fx nor torch.export)."""


class PlanError(LocalizeError):
    """No partition satisfies the request (too many blocks, bad cut names, no trainable parameters)."""


class ConfigError(LocalizeError):
    """An argument of transform() or of a strategy is of the wrong type or out of range."""


class VerificationError(LocalizeError):
    """A pass produced a graph that breaks an invariant (a bug in localize, reported with the pass name)."""


class TargetError(LocalizeError):
    """A training target does not fit the loss (shape or dtype)."""


class InputError(LocalizeError):
    """Inputs given to a LocalModel do not fit the traced model (shape, dtype or device)."""
