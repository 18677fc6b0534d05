"""User-facing errors: each message is one sentence naming the key, file or value at fault."""


class EISAMError(Exception):
    """Bad input (configuration, data or model files) reported without a traceback by the CLI."""


class DatasetNotFoundError(EISAMError, FileNotFoundError):
    """The atomic files of a dataset are missing and could not be downloaded."""


class NonFiniteLossError(EISAMError):
    """The training loss became nan or inf; training stopped before the weights were updated."""


class TrainingInterrupted(KeyboardInterrupt):
    """SIGINT / SIGTERM stopped training after a checkpoint to resume from was written.

    A ``KeyboardInterrupt`` so that code which stops on Ctrl-C (the CLI, the benchmark
    grid) stops here too; ``exit_code`` is the shell's 128 + signal number.
    """

    def __init__(self, message, exit_code=130, checkpoint=None):
        super().__init__(message)
        self.exit_code = exit_code
        self.checkpoint = checkpoint
