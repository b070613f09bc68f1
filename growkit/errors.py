"""One exception type for every user-facing failure, so the CLI can print one line and exit non-zero."""


class GrowkitError(Exception):
    """A problem with the user's input or environment, described in one line that names the file and the problem."""
