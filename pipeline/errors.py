"""Errors shared by processors, actors, server and CLI.

The class of an error decides what happens to the task: a ``BadInput`` fails
at once with its message shown to the user; a ``GpuError`` is specific to the
GPU and may be retried on a CPU worker; anything else is retried with backoff.
"""


class PipelineError(Exception):
    """Base of morag-pipeline's own errors."""


class BadInput(PipelineError):
    """The input can never be processed: corrupt, empty or unsupported.

    Never retried.
    """


class UnsupportedType(BadInput):
    """The content is of a kind no processor handles."""


class ChecksumMismatch(PipelineError):
    """A file's SHA-256 does not match the value it was sent with."""


class TransferError(PipelineError):
    """A file could not be moved between a worker and the store, after every attempt."""


class GpuError(PipelineError):
    """The GPU could not run the task (out of memory, no device, model failed to load)."""


class ModelNotFound(BadInput):
    """The configured model cannot be found or loaded."""


class UnsupportedSchema(BadInput):
    """A message written in a schema this release does not read (a newer peer): refused, never guessed at."""


class TaskNotFound(PipelineError):
    """No task has this id."""


class TaskEnded(PipelineError):
    """The task ended (done, failed or canceled) while this message of it waited: nothing is left
    to do. A message delivered again after its task ended, say after a broker restart, is
    acknowledged with a note, never retried or dead-lettered."""


class TaskCanceled(PipelineError):
    """The task was canceled while a worker ran it; it stops and leaves nothing behind."""


class AccessRefused(BadInput):
    """The server refused this worker the task's files: the task ended, or its transfer grant is
    forged, or it expired for a task the server no longer knows.

    Retrying the same message cannot help.
    """


class UnprovenMessage(AccessRefused):
    """A task message whose transfer grant opens nothing: none, forged, or another task's.

    The server did not send it, so nothing is said of the task it names: it is
    dead-lettered with the reason, and no report is made.
    """
