"""The one base of every error weightbias reports to a person.

Every package's own errors (a bad spec, an unreadable store, a foreign checkpoint, a detector
folder that does not add up...) derive from :class:`WeightbiasError`, so the command line
catches one type and prints one line naming the input, and a notebook user can write
``except WeightbiasError``. It lives in a module that imports nothing, so the lightest layers
(spec parsing, store reading) can raise it without pulling in torch.
"""

from __future__ import annotations


class WeightbiasError(Exception):
    """A failure a user can act on; its message names the offending input."""
