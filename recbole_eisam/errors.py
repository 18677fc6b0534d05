"""User-facing errors: each message is one sentence naming the key, file or value at fault."""


class EISAMError(Exception):
    """Bad input (configuration, data or model files) reported without a traceback by the CLI."""


class DatasetNotFoundError(EISAMError, FileNotFoundError):
    """The atomic files of a dataset are missing and could not be downloaded."""
