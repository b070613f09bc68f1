"""One exception type for every user-facing failure, so the CLI can print one line and exit non-zero."""


class GrowkitError(Exception):
    """A problem with the user's input or environment, described in one line that names the file and the problem."""


class Interrupted(GrowkitError):
    """SIGINT or SIGTERM stopped a run; whatever it had half-written has been removed. The CLI exits 130."""

    exit_code = 130
