"""The one exception type for user-facing mistakes (bad config, data, checkpoint, CLI argument)."""


class MoATrainError(ValueError):
    """A problem the user can fix. Its message is one line that names the problem and the fix.

    The command-line entry points print it as ``error: <message>`` and exit with status 2; the full
    traceback is shown only with ``HYDRA_FULL_ERROR=1``.
    """
