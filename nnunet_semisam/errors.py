"""One error type for everything a user can get wrong.

`nnunet-semisam` prints a `SemiSAMError` as one line (`error: ...`) and exits with status 2; library callers catch
it like any exception. Messages name the offending file or value and, where there is one, the fix.
"""


class SemiSAMError(Exception):
    """A user-facing error: bad input, missing configuration, inconsistent data. Message is one actionable line."""
