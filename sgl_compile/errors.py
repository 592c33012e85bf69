"""Errors a user can cause. The CLI prints them as one line; the server turns them into 4xx."""


class SglcError(Exception):
    """A problem with the user's input or environment, stated in one line (no traceback)."""
