"""Errors of the training run that a user can act on."""


class TrainError(RuntimeError):
    """A failure the user can act on (one line, no traceback): no checkpoint to resume, a
    checkpoint of another model, no smaller micro-batch left after an out-of-memory error."""
