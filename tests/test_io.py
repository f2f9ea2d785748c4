"""spectra.io: the --out rule, atomic replacement at every kill point, recovery, and the advisory lock."""

import json
import os
import socket

import pytest

from spectra import io
from spectra.errors import OutputError


def _write_tree(path, files):
    path.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_text(text)


def _tree(path):
    return {str(p.relative_to(path)): p.read_text() for p in sorted(path.rglob("*")) if p.is_file()}


OLD = {"a.txt": "old a", "sub/b.txt": "old b", "sub/c.txt": "old c", "d.txt": "old d"}
NEW = {"a.txt": "new a", "e.txt": "new e", "sub/f.txt": "new f"}


def test_out_rule_refuses_foreign_paths_and_force_lifts_it(tmp_path):
    out = tmp_path / "out"
    assert io.check_output(out, "pack") == out  # new path
    out.mkdir()
    io.check_output(out, "pack")  # an empty directory holds nothing to lose
    (out / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match="--force"):
        io.check_output(out, "pack")
    io.check_output(out, "pack", force=True)
    (out / io.MARKER_FILE).write_text(json.dumps({"command": "pack"}))
    io.check_output(out, "pack")  # a previous output of the same command
    with pytest.raises(OutputError, match="--force"):
        io.check_output(out, "quantize")
    with pytest.raises(OutputError, match="--force"):
        io.check_output(out, "data prepare", replace_own=False)
    # Source and output may never overlap, even with --force: the issue's `pack proj/ckpt --out proj`.
    src = tmp_path / "proj" / "ckpt"
    src.mkdir(parents=True)
    for target in (tmp_path / "proj", src, src / "inner"):
        with pytest.raises(OutputError, match="never writes into its input"):
            io.check_output(target, "pack", force=True, sources=[src])
    file = tmp_path / "f.gguf"
    file.write_text("not gguf")
    with pytest.raises(OutputError, match="--force"):
        io.check_output(file, "export gguf", kind="file", recognize=lambda p: p.read_bytes()[:4] == b"GGUF")
    with pytest.raises(OutputError, match="is a directory"):
        io.check_output(tmp_path, "export gguf", kind="file", force=True)
    with pytest.raises(OutputError, match="not a directory"):
        io.check_output(file, "pack", force=True)


def test_atomic_dir_replaces_and_marks_and_respects_umask(tmp_path):
    out = tmp_path / "out"
    _write_tree(out, OLD)
    old_umask = os.umask(0o022)
    try:
        with io.atomic_dir(out, "pack") as staging:
            _write_tree(staging, NEW)
            os.chmod(staging / "a.txt", 0o600)  # as safetensors' save_file creates its files
    finally:
        os.umask(old_umask)
    assert _tree(out) == {**NEW, io.MARKER_FILE: '{"command": "pack"}\n'}
    assert io.output_owner(out) == "pack"
    assert (out.stat().st_mode & 0o777) == 0o755
    assert {p.stat().st_mode & 0o777 for p in out.rglob("*")} == {0o644, 0o755}
    with io.atomic_file(tmp_path / "x.json") as tmp:
        tmp.write_text("{}")
    assert (tmp_path / "x.json").stat().st_mode & 0o777 == 0o644  # not mkstemp's 0600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "x.json"]


def _count_steps(exchange: bool, tmp_path) -> int:
    steps = []
    io._STEP_HOOK, io._EXCHANGE_SUPPORTED = steps.append, exchange
    try:
        out = tmp_path / "count"
        _write_tree(out, OLD)
        with io.atomic_dir(out, "pack") as staging:
            _write_tree(staging, NEW)
    finally:
        io._STEP_HOOK, io._EXCHANGE_SUPPORTED = None, True
    return len(steps)


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2-exchange", "two-renames"])
def test_kill_at_every_step_leaves_old_or_new_and_next_run_recovers(tmp_path, exchange):
    """kill -9 (os._exit in a forked child) before each rename/unlink/rmdir of a directory replace."""
    total = _count_steps(exchange, tmp_path)
    assert total >= len(OLD) + 3  # renames plus one step per deleted entry of the old output
    marker = {io.MARKER_FILE: '{"command": "pack"}\n'}
    outcomes = set()
    for k in range(total + 1):
        out = tmp_path / f"run{k}" / "out"
        _write_tree(out, OLD)
        pid = os.fork()
        if pid == 0:  # the writer, killed at step k (never at k == total: it finishes)
            seen = []

            def hook(step, seen=seen, k=k):
                if len(seen) == k:
                    os._exit(137)
                seen.append(step)
            io._STEP_HOOK, io._EXCHANGE_SUPPORTED = hook, exchange
            with io.atomic_dir(out, "pack") as staging:
                _write_tree(staging, NEW)
            os._exit(0)
        _, status = os.waitpid(pid, 0)
        assert os.WEXITSTATUS(status) == (137 if k < total else 0)
        # Right after the kill: the final path holds the complete old or the complete new output, except in the
        # two-rename fallback between its renames, where the old output waits in its sibling for recovery.
        state = _tree(out) if out.exists() else None
        assert state in (OLD, {**NEW, **marker}) or (not exchange and state is None)
        # The next run (any writer of that path) recovers: stale siblings gone, old or new output in place.
        io.recover(out)
        state = _tree(out)
        assert state in (OLD, {**NEW, **marker})
        outcomes.add("new" if state != OLD else "old")
        assert [p.name for p in out.parent.iterdir()] == ["out"]
    assert outcomes == {"old", "new"}


def test_recover_leaves_live_writers_alone(tmp_path):
    out = tmp_path / "out"
    _write_tree(out, OLD)
    live = tmp_path / f".out.spectra-tmp-{os.getpid()}@{io._host()}-abcdef"
    other_host = tmp_path / ".out.spectra-tmp-1@some-other-host-abcdef"
    live.mkdir()
    other_host.mkdir()
    assert io.recover(out) == []
    assert live.exists() and other_host.exists()


def test_lock_refuses_a_second_writer_and_takes_over_a_stale_lock(tmp_path):
    out = tmp_path / "out"
    with io.output_lock(out, "pack") as lock:
        holder = json.loads(lock.read_text())
        assert holder["pid"] == os.getpid() and holder["host"]
        with pytest.raises(OutputError, match=f"locked by process {os.getpid()}"):
            with io.output_lock(out, "pack"):
                pass
    assert not lock.exists()  # released
    # A lock left by a dead process on this host is taken over; one on another host is not.
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)  # `pid` is now dead
    lock.write_text(json.dumps({"pid": pid, "host": io._host(), "what": "pack"}))
    with io.output_lock(out, "pack"):
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    lock.write_text(json.dumps({"pid": pid, "host": "not-" + socket.gethostname(), "what": "pack"}))
    with pytest.raises(OutputError, match="delete .* if that process is gone"):
        with io.output_lock(out, "pack"):
            pass


def test_plain_file_names():
    assert io.is_plain_file_name("model-00001-of-00002.safetensors")
    for bad in ("../x.safetensors", "/etc/passwd", "a/b.bin", "..", ".", "", None, 3, "a\\b"):
        assert not io.is_plain_file_name(bad)


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2-exchange", "two-renames"])
def test_an_error_at_any_step_leaves_old_or_new_and_no_debris(tmp_path, exchange, monkeypatch):
    """A failing rename or delete (disk error, not a kill) is cleaned up at once, without waiting for recovery."""
    total = _count_steps(exchange, tmp_path)
    monkeypatch.setattr(io, "_EXCHANGE_SUPPORTED", exchange)
    for k in range(total):
        out = tmp_path / f"err{k}" / "out"
        _write_tree(out, OLD)
        seen = []

        def hook(step, seen=seen, k=k):
            seen.append(step)
            if len(seen) == k + 1:  # once: the cleanup that follows works
                raise OSError(5, "Input/output error")
        monkeypatch.setattr(io, "_STEP_HOOK", hook)
        try:  # an error before the swap fails the command; one while deleting the old copy does not
            with io.atomic_dir(out, "pack") as staging:
                _write_tree(staging, NEW)
        except OSError:
            assert _tree(out) == OLD
        monkeypatch.setattr(io, "_STEP_HOOK", None)
        assert _tree(out) in (OLD, {**NEW, io.MARKER_FILE: '{"command": "pack"}\n'})
        assert [p.name for p in out.parent.iterdir()] == ["out"]


def test_another_processs_writability_probe_does_not_make_a_directory_look_used(tmp_path):
    # under torchrun every rank checks the same --out at once: rank 0's probe file, alive for microseconds, made
    # rank 1 refuse the directory as "not empty and not a training run" (seen once in CI-like runs)
    from spectra.train.rundir import LOCK_FILE, check_run_dir

    out = tmp_path / "run"
    out.mkdir()
    (out / ".spectra-probe-4242-abcdef").write_text("")  # the name _check_writable_parent gives its probe
    assert io.check_output(out, "train") == out
    (out / LOCK_FILE).write_text("{}")
    check_run_dir(out, resuming=False, force=False, data=str(tmp_path / "data"))
    (out / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match="not a training run"):
        check_run_dir(out, resuming=False, force=False, data=str(tmp_path / "data"))
