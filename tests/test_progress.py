"""Progress bars: quiet in logs (stderr not a terminal), normal on a terminal."""

import io

from spectra.progress import LOG_REFRESH_SECONDS, progress_bar


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_transient_bars_are_hidden_in_logs_and_lasting_ones_slowed():
    log = io.StringIO()
    for _ in progress_bar(range(50), file=log, leave=False):
        pass
    assert log.getvalue() == ""
    bar = progress_bar(range(3), file=log)
    assert bar.mininterval == LOG_REFRESH_SECONDS
    list(bar)
    assert "3/3" in log.getvalue()


def test_terminal_bars_keep_tqdm_defaults():
    term = _Terminal()
    bar = progress_bar(range(3), file=term, leave=False)
    assert not bar.disable and bar.mininterval < LOG_REFRESH_SECONDS
    list(bar)
    assert "0/3" in term.getvalue()  # drawn (and cleared at the end: leave=False)
