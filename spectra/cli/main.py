"""Entry point of `spectra`. Every module in this package with a `register(subparsers)` adds its commands."""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
import warnings

from ..errors import SpectraError, SpectraWarning


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="spectra", description="Ternary language models: train, pack, run, study.")
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


def _show_warning(message, category, filename, lineno, file=None, line=None, _default=warnings.showwarning):
    # A warning about the user's input is one line, like an error; Python's own warnings keep their format.
    if issubclass(category, SpectraWarning):
        print(f"spectra: warning: {message}", file=sys.stderr)
    else:
        _default(message, category, filename, lineno, file, line)


def main(argv: list[str] | None = None) -> int:
    warnings.showwarning = _show_warning
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except SpectraError as err:
        print(f"spectra: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("spectra: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
