"""Progress bars that behave in logs as well as in terminals.

On a terminal this is tqdm as usual. When stderr is not a terminal (CI, `nohup`, output redirected to a file)
tqdm's redraws would fill the log with carriage-return lines: transient bars (``leave=False``) are then not
shown at all, and lasting ones redraw at most every 30 seconds.
"""

from __future__ import annotations

import sys
from typing import Any

from tqdm.auto import tqdm

LOG_REFRESH_SECONDS = 30.0


def progress_bar(*args: Any, **kwargs: Any) -> tqdm:
    """``tqdm(*args, **kwargs)`` with log-friendly defaults when stderr is not a terminal."""
    stream = kwargs.get("file") or sys.stderr
    if not getattr(stream, "isatty", lambda: False)():
        if kwargs.get("leave") is False:
            kwargs["disable"] = True
        kwargs.setdefault("mininterval", LOG_REFRESH_SECONDS)
    return tqdm(*args, **kwargs)
