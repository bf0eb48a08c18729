"""Training errors (importable without Lightning)."""


class NonFiniteLossError(RuntimeError):
    """Training stopped because the loss became NaN or infinite."""
