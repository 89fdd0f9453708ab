"""The one base class of errors a user can fix: bad input, missing data, a failed node process.

The CLI prints such an error's message as one line and exits with code 2; anything else is a bug
and keeps its traceback. Torch-free, so every layer can raise these without importing more.
"""


class UserError(Exception):
    """An error whose message tells the user what to change (it names the field or argument)."""
