"""Exceptions raised by the dataset readers and loaders."""


class DataFormatError(ValueError):
    """A data file is truncated, corrupt or not in the expected format.

    The message always names the offending file.
    """


class DatasetNotFoundError(FileNotFoundError):
    """The files of a dataset are not in the data directory (and were not downloaded).

    The message says which files to put where, and the other ways to get them.
    """
