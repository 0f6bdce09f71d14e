"""UsageError: the one exception for mistakes a user can make.

A bad flag, an impossible sparsity, a missing file: the library raises UsageError with
one sentence that names the value and says what is allowed. The two programs
(train_tiny.py, generate.py) catch it, print the sentence on stderr and exit with 2,
so a user never sees a stack trace for their own typo. Anything else is a bug and
keeps its traceback.
"""


class UsageError(ValueError):
    """A user-caused error; str(e) is the one sentence to show."""
