"""The one base class of errors a user can fix (bad input, bad parameters, missing files).

Stages print these as one clear line and exit with status 2, instead of a traceback from inside a
library.
"""


class UserInputError(ValueError):
    """Bad input the user can fix: the message names the file or parameter and what was expected."""
