"""Entry point of `spectra`. Every module in this package with a `register(subparsers)` adds its commands."""

from __future__ import annotations

import argparse
import errno
import importlib
import os
import pkgutil
import sys
import warnings

from ..errors import SpectraError, SpectraWarning


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="spectra", description="Ternary language models: train, pack, run, study.")
    parser.add_argument("--version", action="version", version=f"spectra {_version()}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    package = importlib.import_module(__package__)
    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name):
        if info.name == "main":
            continue
        module = importlib.import_module(f"{__package__}.{info.name}")
        if hasattr(module, "register"):
            module.register(subparsers)
    return parser


def _version() -> str:
    from .. import __version__
    return __version__


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (usage stays in --help), like every other spectra error."""

    def error(self, message: str) -> None:  # type: ignore[override]
        _fail(f"{self.prog}: {message} (see `{self.prog} --help`)")
        sys.exit(2)


def _show_warning(message, category, filename, lineno, file=None, line=None, _default=warnings.showwarning):
    # A warning about the user's input is one line, like an error; Python's own warnings keep their format.
    if issubclass(category, SpectraWarning):
        print(f"spectra: warning: {message}", file=sys.stderr)
    else:
        _default(message, category, filename, lineno, file, line)


def main(argv: list[str] | None = None) -> int:
    """Run one command. The exception boundary: a SpectraError or an OSError (disk full, read-only or missing
    path) is one line on stderr and exit code 2; anything else is one line and exit 1, with the traceback
    only under SPECTRA_DEBUG=1."""
    warnings.showwarning = _show_warning
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    debug = os.environ.get("SPECTRA_DEBUG", "") not in ("", "0")
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("spectra: interrupted", file=sys.stderr)
        return 130
    except SpectraError as err:
        if debug:
            raise
        _fail(str(err))
        return 2
    except OSError as err:
        if debug:
            raise
        _fail(describe_os_error(err))
        return 2
    except Exception as err:
        if debug:
            raise
        if is_out_of_memory(err):  # sizes the machine cannot hold: the user's to change, like a full disk
            what = (str(err).strip() or type(err).__name__).splitlines()[0][:200]
            _fail(f"out of memory ({what}); use a smaller model, --batch-size or "
                  f"--seq-len, or a machine (GPU) with more memory")
            return 2
        _fail(f"unexpected {type(err).__name__}: {err}; this is a bug in spectra — run with SPECTRA_DEBUG=1 "
              f"for the traceback and report it")
        return 1


def is_out_of_memory(err: BaseException) -> bool:
    """An allocation the machine refused: Python's MemoryError, torch's CUDA OutOfMemoryError, or the CPU
    allocator's RuntimeError ("DefaultCPUAllocator: can't allocate memory")."""
    return isinstance(err, MemoryError) or type(err).__name__ == "OutOfMemoryError" or (
        isinstance(err, RuntimeError) and "can't allocate memory" in str(err))


def describe_os_error(err: OSError) -> str:
    """One line for a failed file operation: what, which path, and what to do."""
    where = " -> ".join(str(p) for p in (err.filename, err.filename2) if p) or "output"
    hints = {
        errno.ENOSPC: "no space left on the device; free some space and run again (an earlier output is intact)",
        errno.EDQUOT: "disk quota exceeded; free some space and run again (an earlier output is intact)",
        errno.EROFS: "the file system is read-only; choose a writable output path",
        errno.EACCES: "permission denied; choose a path you can write (or read)",
        errno.EPERM: "operation not permitted; choose a path you own",
        errno.EISDIR: "is a directory where a file was expected; give a file path",
        errno.ENOTDIR: "a part of the path is a file where a directory was expected; fix the path",
        errno.ENOENT: "no such file or directory; check the path",
        errno.EEXIST: "a file is in the way where a directory is needed; fix the path",
        errno.ENAMETOOLONG: "the path is too long; choose a shorter one",
        errno.EPIPE: "the output pipe was closed before spectra finished writing",
    }
    hint = hints.get(err.errno or -1, f"{err.strerror or err}; check the path and try again")
    return f"{where}: {hint}"


def _fail(message: str) -> None:
    print(f"spectra: error: {' '.join(str(message).split())}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
