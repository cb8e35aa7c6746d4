"""The one error type that reaches users: the CLI prints its message as one line, with no traceback."""


class ArragError(Exception):
    """A problem with the user's input (a file, a flag, a checkpoint): the message names it and says what to do."""
