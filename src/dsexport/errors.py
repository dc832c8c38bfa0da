"""The exception types live in dsexport.core.errors; this name stays for users' code."""

from dsexport.core.errors import (  # noqa: F401
    BundleError, CheckpointError, ContextLengthError, EngineUnavailable, InternalError, UserError)
