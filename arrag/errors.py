"""The one error type that reaches users: the CLI prints its message as one line, with no traceback."""


class ArragError(Exception):
    """A problem with the user's input (a file, a flag, a checkpoint): the message names it and says what to do."""


def one_line(error: BaseException | str, limit: int = 300) -> str:
    """A library's (possibly multi-line) message as one line: whitespace collapsed, cut at `limit` characters."""
    text = " ".join(str(error).split())
    return text if len(text) <= limit else text[:limit - 1].rstrip() + "…"
