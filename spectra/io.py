"""Safe outputs: atomic files and directories, the `--out`/`--force` rule, and advisory locks.

Every writer in spectra goes through this module, so one set of guarantees holds for all commands:

* `atomic_file(path)` yields a temporary sibling path; on success the file is fsynced, given the
  permissions of a normally created file (umask respected) and renamed over `path`. On error or kill the
  old `path` is untouched. `write_text_atomic(path, text)` is the one-line form, `save_figure(fig, path)` the
  one for matplotlib figures.
* `atomic_dir(path, owner)` yields an empty staging directory beside `path`; on success a marker file
  (`.spectra-output.json`, naming `owner`) is added, everything is fsynced and the staging directory
  replaces `path`. On Linux the swap is one `renameat2(RENAME_EXCHANGE)`, so `path` holds the complete old
  or the complete new output at every instant; elsewhere it is two renames, and a run killed between them
  is repaired by `recover(path)` (called by every `atomic_dir`/`atomic_file` and `check_output`), which puts
  the old output back and removes stale siblings. Siblings are named `.NAME.spectra-{tmp,old}-PID@HOST-XXXXXX`,
  so only ones whose process is dead on this host are touched.
* `check_output(path, owner, force)` is the `--out` rule: a missing path, an empty directory or a previous
  output of the same `owner` may be written; anything else is refused (OutputError naming `--force`), and
  a path that is, contains or lies inside a source (`sources=`) is always refused.
* `hold_lock(lock_file, what)` / `output_lock(path, what)`: an advisory lock file holding the owner's pid
  and host. A second writer gets an OutputError; a lock left by a dead process on this host is taken over.

A new command (e.g. fine-tuning) writes its output with::

    with output_lock(out, "finetune"):
        check_output(out, "finetune", force=force, sources=[base_checkpoint])
        ...load and compute: nothing is written yet...
        with atomic_dir(out, "finetune") as staging:   # or save_checkpoint(..., owner="finetune", force=force)
            ...write files into staging...

A process that writes into a directory for a long time (a training run) holds
`hold_lock(directory / ".spectra-lock", what)` instead. Shard names read from index files are checked with
`is_plain_file_name`, inputs with `is_regular_file`.

Tests inject a kill at any step through `_STEP_HOOK` (called with a step name before every rename/delete).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import re
import shutil
import socket
import stat
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from .errors import OutputError

MARKER_FILE = ".spectra-output.json"
LOCK_SUFFIX = ".spectra-lock"
_SIBLING = re.compile(r"^\.(?P<name>.+)\.spectra-(?P<kind>tmp|old)-(?P<pid>\d+)@(?P<host>.+)-[0-9a-f]{6}$")
_STEP_HOOK: Callable[[str], None] | None = None  # tests: simulate kill -9 at a chosen step
_EXCHANGE_SUPPORTED = True  # cleared when the kernel or filesystem lacks renameat2(RENAME_EXCHANGE)


def _step(name: str) -> None:
    if _STEP_HOOK is not None:
        _STEP_HOOK(name)


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9.-]", "_", socket.gethostname()) or "host"


def _named(path: str | Path) -> Path:
    """`path` made absolute and normal, so that it has a name to derive siblings from ('.' and 'a/..' do not)."""
    normal = Path(os.path.abspath(path))
    if not normal.name:
        raise OutputError(f"{path} is the root of the file system; choose an output path below it")
    return normal


def _sibling(path: Path, kind: str) -> Path:
    path = _named(path)
    return path.with_name(f".{path.name}.spectra-{kind}-{os.getpid()}@{_host()}-{uuid.uuid4().hex[:6]}")


def _pid_alive(pid: int) -> bool:
    if pid <= 0:  # 0 and negative ids name process groups, not a writer
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# --- removal and fsync ------------------------------------------------------------------------------

def _remove(path: Path) -> None:
    """Delete a file or directory tree, one step per entry (so tests can interrupt it anywhere)."""
    if path.is_symlink() or not path.is_dir():
        _step("unlink")
        path.unlink(missing_ok=True)
        return
    for root, dirs, files in os.walk(path, topdown=False):
        for name in files + [d for d in dirs if os.path.islink(os.path.join(root, d))]:
            _step("unlink")
            os.unlink(os.path.join(root, name))
        for name in dirs:
            if not os.path.islink(os.path.join(root, name)):
                _step("rmdir")
                os.rmdir(os.path.join(root, name))
    _step("rmdir")
    os.rmdir(path)


def _discard(path: Path) -> None:
    """Delete a replaced output. The new one is already in place, so a failure here does not fail the command:
    what is left is retried at once, and whatever still remains is removed by the next `recover`."""
    try:
        _remove(path)
    except OSError:
        shutil.rmtree(path, ignore_errors=True)


def _fsync_path(path: Path, directory: bool = False) -> None:
    """Flush a file to disk (its errors, e.g. ENOSPC surfacing late, propagate) or a directory's entries (some
    filesystems refuse that: ignored, the files themselves were flushed)."""
    try:
        fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0))
    except OSError:
        if directory:
            return
        raise
    try:
        os.fsync(fd)
    except OSError:
        if not directory:
            raise
    finally:
        os.close(fd)


def _finish_tree(path: Path) -> None:
    """Give every file and directory of a staged output the umask's permissions (safetensors and mkstemp create
    0600 files), and flush them to disk."""
    umask = _umask()
    for root, dirs, files in os.walk(path):
        for name in files:
            os.chmod(Path(root) / name, 0o666 & ~umask)
            _fsync_path(Path(root) / name)
        for name in dirs:
            os.chmod(Path(root) / name, 0o777 & ~umask)
        _fsync_path(Path(root), directory=True)


# --- recovery ---------------------------------------------------------------------------------------

def recover(path: str | Path) -> list[Path]:
    """Repair what a killed writer of `path` left: restore a moved-away old output, delete stale temporaries.

    Only siblings whose writer (pid@host in the name) is dead on this host are touched; returns them.
    """
    path = _named(path)
    if not path.parent.is_dir():
        return []
    stale = []
    for entry in path.parent.iterdir():
        match = _SIBLING.match(entry.name)
        if not match or match["name"] != path.name or match["host"] != _host() or _pid_alive(int(match["pid"])):
            continue
        stale.append((match["kind"] != "old", entry))  # old copies first: one may have to be put back
    handled = []
    for is_tmp, entry in sorted(stale):
        if not is_tmp and not os.path.lexists(path):
            _step("restore")
            os.rename(entry, path)  # killed between the two renames of a swap: the old output comes back
        else:
            _remove(entry)
        handled.append(entry)
    return handled


# --- the --out rule ---------------------------------------------------------------------------------

def output_owner(path: str | Path) -> str | None:
    """The command that wrote directory `path` (its marker), or None."""
    try:
        data = json.loads((Path(path) / MARKER_FILE).read_text())
    except (OSError, ValueError):
        return None
    return data.get("command") if isinstance(data, dict) else None


def _inside(a: Path, b: Path) -> bool:
    return a == b or b in a.parents


def check_output(path: str | Path, owner: str, force: bool = False, kind: str = "dir",
                 sources: Iterable[str | Path] = (), recognize: Callable[[Path], bool] | None = None,
                 replace_own: bool = True, flag: str = "--out") -> Path:
    """Refuse to write `path` unless it is new, an empty directory or (with `replace_own`) a previous output
    of `owner`; `force` lifts the refusal. A path that is a source, holds one or lies inside one is always
    refused. `kind` is "dir" or "file"; `recognize(path)` tells a previous output of `owner` without a marker
    (files, and directories written before markers existed)."""
    path = Path(path)
    recover(path)
    resolved = path.resolve()
    for source in sources:
        src = Path(source).resolve()
        if _inside(resolved, src) or _inside(src, resolved):
            raise OutputError(f"{flag} {path} is, contains or lies inside the source {source}; spectra never "
                              f"writes into its input: choose an output path outside it")
    if not os.path.lexists(path):
        _check_writable_parent(path, flag)
        return path
    if kind == "dir":
        if path.is_symlink():  # replacing it would swap the link, not what it points to
            raise OutputError(f"{flag} {path} is a symbolic link; give the directory path it points to")
        if not path.is_dir():
            raise OutputError(f"{flag} {path} exists and is not a directory; give a directory path")
        if not entries(path):
            return path
        if replace_own and (output_owner(path) == owner or (recognize is not None and _safe(recognize, path))):
            return path
        what = f"a previous output of `spectra {owner}`" if replace_own else "empty"
    else:
        if path.is_dir():
            raise OutputError(f"{flag} {path} is a directory; give a file path")
        if not path.is_file():
            raise OutputError(f"{flag} {path} exists and is not a regular file; choose another path")
        if replace_own and recognize is not None and _safe(recognize, path):
            return path
        what = f"a previous output of `spectra {owner}`"
    if force:
        return path
    raise OutputError(f"{flag} {path} already exists and is not {what}; choose another path or pass --force "
                      f"to replace it")


PROBE_PREFIX = ".spectra-probe-"  # the short-lived file _check_writable_parent creates and removes


def entries(directory: Path) -> list[Path]:
    """What `directory` holds, less another process's writability probe (PROBE_PREFIX), which exists for
    microseconds: under torchrun every rank checks the same output directory at once, and one rank's probe
    made the other refuse the directory as not empty."""
    return [p for p in directory.iterdir() if not p.name.startswith(PROBE_PREFIX)]


def _check_writable_parent(path: Path, flag: str) -> None:
    """Fail now, not after hours of work, when `path` cannot be created: its nearest existing ancestor must be
    a directory this process can create files in (tried with a probe file that is removed at once)."""
    ancestor = path.parent
    while not os.path.lexists(ancestor) and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise OutputError(f"{flag} {path} cannot be created: {ancestor} is a file, not a directory; fix the path")
    probe = ancestor / f"{PROBE_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:6]}"
    try:
        os.close(os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    except OSError as err:
        raise OutputError(f"{flag} {path} cannot be created: {ancestor} does not take new files "
                          f"({err.strerror}); choose a writable location") from None
    os.unlink(probe)


def _safe(recognize: Callable[[Path], bool], path: Path) -> bool:
    try:
        return bool(recognize(path))
    except (OSError, ValueError):
        return False


def read_json(path: Path, error: type[Exception], fix: str) -> object:
    """The JSON value in file `path`, or one `error` naming the file, what is wrong with it and `fix`."""
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise error(f"{path} is not valid JSON ({err}); {fix}") from None


def json_recognizer(test: Callable[[dict], bool]) -> Callable[[Path], bool]:
    """A `recognize` for JSON outputs: the file parses as a JSON object that passes `test`."""
    def recognize(path: Path) -> bool:
        if path.stat().st_size > 64 << 20:
            return False
        data = json.loads(path.read_text(encoding="utf-8"))
        return isinstance(data, dict) and test(data)
    return recognize


def png_recognizer(path: Path) -> bool:
    """A PNG that spectra wrote (savefig with metadata Software="spectra ...")."""
    with path.open("rb") as f:
        head = f.read(1 << 16)
    return head.startswith(b"\x89PNG\r\n\x1a\n") and b"Software\x00spectra" in head


# --- atomic writers ---------------------------------------------------------------------------------

@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling of `path` to write; on success it replaces `path` in one rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    recover(path)
    if path.is_dir():
        raise OutputError(f"{path} is a directory; give a file path")
    tmp = _sibling(path, "tmp")
    os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))  # umask applies
    try:
        yield tmp
        _fsync_path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # writers that recreate the file (savefig, gguf) keep the mode
        _step("rename")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_path(path.parent, directory=True)


def write_text_atomic(path: str | Path, text: str) -> Path:
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def check_figure_output(path: str | Path, force: bool = False, sources: Iterable[str | Path] = (),
                        flag: str = "--out") -> Path:
    """The `--out` rule for a figure (see check_output), plus a file suffix matplotlib can write (none: PNG).
    Commands call it before their work, so a bad path fails at once."""
    from matplotlib.backend_bases import FigureCanvasBase

    path = Path(path)
    fmt = (path.suffix[1:] or "png").lower()
    formats = FigureCanvasBase.get_supported_filetypes()
    if fmt not in formats:
        raise OutputError(f"{flag} {path}: a figure cannot be written as .{fmt}; give a .png path (or .pdf, .svg)")
    return check_output(path, "plot", force=force, kind="file", recognize=png_recognizer, sources=sources,
                        flag=flag)


def save_figure(fig, path: str | Path, dpi: int = 100, force: bool = False, sources: Iterable[str | Path] = (),
                flag: str = "--out") -> Path:
    """Save a matplotlib figure atomically, then close it. An existing file that is not a PNG spectra wrote
    is refused unless `force`, a path inside a source always; PNGs carry Software="spectra" so a later run
    recognises them."""
    import matplotlib.pyplot as plt

    path = Path(path)
    try:
        check_figure_output(path, force=force, sources=sources, flag=flag)
        fmt = (path.suffix[1:] or "png").lower()
        with atomic_file(path) as tmp:
            fig.savefig(tmp, dpi=dpi, format=fmt, metadata={"Software": "spectra"} if fmt == "png" else None)
    finally:
        plt.close(fig)
    return path


@contextlib.contextmanager
def atomic_dir(path: str | Path, owner: str) -> Iterator[Path]:
    """Yield an empty staging directory; on success it replaces directory `path` (see the module docstring).

    The caller checks `path` first (`check_output`) and holds its lock when other processes may write it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    recover(path)
    staging = _sibling(path, "tmp")
    os.mkdir(staging)  # mode 0o777 & ~umask, unlike mkdtemp's 0o700
    try:
        yield staging
        (staging / MARKER_FILE).write_text(json.dumps({"command": owner}) + "\n")
        _finish_tree(staging)
        replace_dir(staging, path)
    except BaseException:
        if staging.exists():
            _discard(staging)
        raise


def replace_dir(new: Path, path: Path) -> None:
    """Put directory `new` at `path` (which may exist, as a directory); the previous content is deleted."""
    if not os.path.lexists(path):
        _step("rename")
        os.rename(new, path)
    elif _EXCHANGE_SUPPORTED and _exchange(new, path):
        _discard(new)  # `new` now names the old output
    else:
        old = _sibling(path, "old")
        _step("rename-old")
        os.rename(path, old)
        try:
            _step("rename-new")
            os.rename(new, path)
        except BaseException:
            os.rename(old, path)  # an error (not a kill) between the renames: the old output goes back now
            raise
        _discard(old)
    _fsync_path(path.parent, directory=True)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    global _EXCHANGE_SUPPORTED
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        _EXCHANGE_SUPPORTED = False
        return False
    at_fdcwd, rename_exchange = -100, 2
    _step("exchange")
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        _EXCHANGE_SUPPORTED = False
        return False
    raise OSError(err, os.strerror(err), str(b))


# --- locks ------------------------------------------------------------------------------------------

def _read_holder(lock: Path) -> dict | None:
    try:
        data = json.loads(lock.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _stale(holder: dict | None, lock: Path) -> bool:
    if holder is None:  # unreadable: a writer killed while writing it, unless it is brand new
        try:
            return time.time() - lock.stat().st_mtime > 5
        except FileNotFoundError:
            return True
    try:
        pid = int(holder.get("pid", 0))
    except (TypeError, ValueError):
        return True  # not a lock this code wrote
    return holder.get("host") == _host() and not _pid_alive(pid)


@contextlib.contextmanager
def hold_lock(lock: str | Path, what: str) -> Iterator[Path]:
    """Hold the advisory lock file `lock` (pid and host of this process) for the `with` block.

    A live holder makes it an OutputError; a lock of a dead process on this host is taken over.
    """
    lock = Path(lock)
    lock.parent.mkdir(parents=True, exist_ok=True)
    me = {"pid": os.getpid(), "host": _host(), "what": what, "since": time.strftime("%Y-%m-%dT%H:%M:%S")}
    for _ in range(5):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
        except FileExistsError:
            holder = _read_holder(lock)
            if holder == {}:
                continue  # released in between
            if not _stale(holder, lock):
                who = (f"process {holder.get('pid')} on {holder.get('host')} ({holder.get('what')}, since "
                       f"{holder.get('since')})") if holder else "a process that is starting"
                raise OutputError(f"{what} is locked by {who}; wait for it to finish, or delete {lock} if that "
                                  f"process is gone") from None
            # Take the stale lock over: move it aside under a unique name first, so two takers cannot both win.
            aside = lock.with_name(f"{lock.name}.stale-{os.getpid()}-{uuid.uuid4().hex[:6]}")
            with contextlib.suppress(FileNotFoundError):
                os.rename(lock, aside)
                aside.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(me) + "\n")
        break
    else:
        raise OutputError(f"could not take the lock {lock} for {what}; another process keeps taking it")
    try:
        yield lock
    finally:
        holder = _read_holder(lock)
        if holder and holder.get("pid") == me["pid"] and holder.get("host") == me["host"]:
            lock.unlink(missing_ok=True)


def lock_path(path: str | Path) -> Path:
    """The lock file of output `path`: a hidden sibling, so it survives the output's replacement."""
    path = _named(path)
    return path.with_name(f".{path.name}{LOCK_SUFFIX}")


@contextlib.contextmanager
def output_lock(path: str | Path, what: str) -> Iterator[Path]:
    """Hold the lock of output `path`; directories created for it are removed again if they stay empty."""
    with removing_new_empty_dirs(Path(path).parent):
        with hold_lock(lock_path(path), f"{what} --out {path}") as lock:
            yield lock


@contextlib.contextmanager
def removing_new_empty_dirs(path: str | Path) -> Iterator[None]:
    """On exit, remove `path` and the ancestors this block created, as far as they are empty: a command that
    fails leaves no new directory behind."""
    missing = []
    current = Path(path).absolute()
    while not os.path.lexists(current) and current != current.parent:
        missing.append(current)
        current = current.parent
    try:
        yield
    finally:
        for directory in missing:  # deepest first
            try:
                directory.rmdir()
            except OSError:
                break  # not empty (the output is there) or already gone


def is_plain_file_name(name: object) -> bool:
    """A file name that stays inside its directory: no separators, not absolute, not `.`/`..`."""
    return (isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\\" not in name
            and "\0" not in name and not os.path.isabs(name))


def is_regular_file(path: Path) -> bool:
    """A plain file (not a FIFO, socket or device, which would block or never end when read)."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False


__all__ = ["MARKER_FILE", "atomic_dir", "atomic_file", "check_output", "hold_lock", "json_recognizer",
           "lock_path", "output_lock", "output_owner", "png_recognizer", "recover", "replace_dir",
           "write_text_atomic", "is_plain_file_name", "is_regular_file", "save_figure", "check_figure_output",
           "removing_new_empty_dirs"]
