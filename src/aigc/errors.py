"""The one exception type for problems a user can fix.

Library code raises `AigcError` with a message that names the bad value and the fix; `aigc.cli`
prints it as a single line on stderr and exits with code 2. Internal invariants use `assert`.
"""


class AigcError(Exception):
    """A user-facing error: bad input, missing file, invalid option. Message is one line."""
