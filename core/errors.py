"""Two kinds of failure, kept apart: the user's input is wrong, or dsexport is wrong.

`UserError` carries one line that names the problem; the CLI prints it without a traceback
and exits with `exit_code`. Anything else escaping is a bug in dsexport and keeps its traceback.
"""


class UserError(Exception):
    """Bad input: a checkpoint, a flag, a bundle, a prompt. The message is shown as is."""

    exit_code = 2


class CheckpointError(UserError):
    """The checkpoint directory is missing, corrupt, or of an unsupported architecture."""

    exit_code = 3


class BundleError(UserError):
    """An exported model directory is missing files, or a file does not match its checksum."""

    exit_code = 4


class NumericalError(BundleError):
    """A graph produced NaN or Inf: the bundle's weights are corrupt, or a computation overflowed."""


class ContextLengthError(UserError):
    """A prompt (plus the tokens asked for) does not fit in the context."""

    exit_code = 5


class EngineUnavailable(UserError):
    """The bundle's engine cannot run on this machine (e.g. a TensorRT engine without a GPU)."""

    exit_code = 3


class InternalError(Exception):
    """An invariant of dsexport itself failed. Report it; it is not the user's input."""


class OutputError(UserError):
    """The output cannot be written: no space left, no permission, a path that must not be replaced."""

    exit_code = 6
