"""The ``stacklevel`` that makes a warning name the user's line, not fnnet's."""

from __future__ import annotations

import os
import sys

_PACKAGE = os.path.dirname(os.path.abspath(__file__)) + os.sep


def user_stacklevel() -> int:
    """``warnings.warn(..., stacklevel=user_stacklevel())`` names the first caller outside fnnet.

    A fixed ``stacklevel`` names the right line for one call path only: ``from_torch`` is called
    by the user and by the ``Trainer``, and callbacks are called by the ``Trainer``'s loop.
    (Python 3.12's ``skip_file_prefixes`` does this; fnnet supports 3.10.)
    """
    frame = sys._getframe(2)  # the caller of the function that warns: stacklevel 2
    level = 2
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(_PACKAGE):
        frame = frame.f_back
        level += 1
    return level
