# The one exception the host core raises for a user's mistake or a refused operation.
# The CLI turns it into a one-line message on stderr and exit code 2; no traceback.


class TopupError(Exception):
    """A clear, one-line, user-facing error. Nothing was changed when it is raised."""

    exit_code = 2

    def __init__(self, message):
        super().__init__(message)
        self.message = message

    def __str__(self):
        return self.message


class DatabaseUnavailable(TopupError):
    """The database server cannot be reached, or went away mid-command (PostgreSQL): the
    transaction was not committed. The service answers 503."""

    exit_code = 1
