"""Files in and out: atomic writes with ordinary modes, safe loading of torch files, output paths checked first.

Every file the project writes goes through :func:`atomic_write`: the bytes go to a temporary name in the target
folder (created ``0666`` minus the umask, like any ordinary file, not ``mkstemp``'s private ``0600``), are
flushed to disk, and the temporary file is renamed over the target; on any failure the temporary file is
removed and the target is left as it was. A reader therefore sees the old file or the new one, never half.

Every ``torch.load`` of a file a user can hand us goes through :func:`load_torch`: ``weights_only=True`` (the
unpickler only builds tensors, containers and plain values, plus the few project data classes a caller
explicitly allows), so a crafted file cannot run code; any failure is one :class:`CraftError` line.

:func:`check_out_dir` / :func:`check_out_file` are called by the CLI before any work starts: the target must
be creatable and writable and of the right kind (a folder where a folder is needed, a file name where a file
is). They create nothing.

:func:`own_output` is what a command wraps its work in (one ``with`` line): it checks the output path, takes
the output's **lock** (one owner per output folder or file, see :class:`OutputLock`), removes staging files
that killed runs left there, and on the way out releases the lock and removes the folders it created if they
are still empty (a run that fails before writing anything leaves no trace). :func:`staged_folder` writes a
set of files beside a folder and moves them in at the end (merged file by file, or replacing the folder as a
whole). A write that the file system refuses (no space, the file-size limit, permissions) is one
:class:`CraftError` line naming the file, with the target left as it was.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
import uuid
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterable, Iterator

from craft.errors import CraftError


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> Path:
    """Call ``write(binary file)`` on a temporary file beside ``path``, then rename it to ``path``.

    The folder is created if needed; the file gets the usual umask-based mode; on any error (including
    KeyboardInterrupt) the temporary file is removed and ``path`` is untouched. A write the file system refuses
    (an ``OSError``, or torch's writer failing on one) is a :class:`CraftError` naming ``path``. Returns ``path``.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except OSError as e:
        raise write_error(path, e) from None
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if is_write_failure(e):
            raise write_error(path, e) from None
        raise
    return path


def is_write_failure(e: BaseException) -> bool:
    """Whether ``e`` is the file system refusing a write: an ``OSError``, or the ``RuntimeError`` torch's zip
    writer raises when the file under it fails (``PytorchStreamWriter failed writing ...``)."""
    if isinstance(e, OSError):
        return True
    text = str(e)
    return isinstance(e, RuntimeError) and ("PytorchStreamWriter" in text or "inline_container" in text
                                             or "file write failed" in text)


def write_error(path: str | os.PathLike, e: BaseException, untouched: bool = True) -> CraftError:
    """The one-line error of a refused write of ``path``: the reason, and what to do about it (``untouched``:
    say that the file was left as it was)."""
    import errno
    import resource

    path = Path(path)
    code = getattr(e, "errno", None)
    if isinstance(e, OSError) and e.strerror:
        reason = e.strerror
    else:
        reason = _first_line(e, 100)
    hint = ""
    soft = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if code == errno.EFBIG or (soft != resource.RLIM_INFINITY and code in (None, errno.EFBIG)):
        hint = (f"the file-size limit is {soft} bytes (ulimit -f): raise it" if soft != resource.RLIM_INFINITY
                else "the file is larger than this file system allows")
    elif code in (errno.ENOSPC, errno.EDQUOT):
        hint = "no space left there: free some or choose another place"
    elif code in (errno.EACCES, errno.EPERM, errno.EROFS):
        hint = "no permission to write there: choose another place"
    else:
        try:
            if shutil.disk_usage(_nearest_existing(path.parent)).free < 1 << 20:
                hint = "the disk is (nearly) full: free some space or choose another place"
        except OSError:
            pass
    return CraftError(f"could not write '{path}': {reason}" + (f" ({hint})" if hint else "")
                      + ("; the file was left as it was" if untouched else ""))


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_write`)."""
    return atomic_write(path, lambda f: f.write(data))


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return write_bytes(path, text.encode())


def write_json(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> Path:
    """Write ``obj`` as JSON to ``path`` atomically (non-JSON values via ``str``)."""
    return write_text(path, json.dumps(obj, indent=indent, default=str))


def save_torch(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save(obj)`` to ``path`` atomically."""
    import torch

    return atomic_write(path, lambda f: torch.save(obj, f))


def save_png(fig, path: str | os.PathLike) -> Path:
    """A matplotlib figure as a PNG at ``path``, written atomically; the figure is closed."""
    import io

    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return write_bytes(path, buf.getvalue())


def _first_line(e: BaseException, limit: int = 160) -> str:
    s = str(e).strip().splitlines()
    line = s[0].strip() if s else ""
    if "Weights only load failed" in line or "weights_only" in line:
        line = "it holds objects other than tensors and plain values (refused unread; it may run code)"
    return (line[:limit] + "...") if len(line) > limit else (line or "unreadable")


def load_torch(path: str | os.PathLike, what: str, allow: Iterable[type] = ()) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU; ``allow``: project data classes it may rebuild.

    Any failure (missing, a folder, truncated, not a torch file, a pickle with other objects) is one
    :class:`CraftError` line naming ``what`` the file should have been.
    """
    import torch

    path = Path(path)
    if not path.exists():
        raise CraftError(f"{what} '{path}' does not exist")
    if path.is_dir():
        raise CraftError(f"{what} '{path}' is a folder, not a file")
    try:
        with torch.serialization.safe_globals(list(allow)), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. "Detected pickle protocol 4": the error line says enough
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CraftError(f"'{path}' is not a readable {what} ({type(e).__name__}: {_first_line(e)})") from None


def read_json(path: str | os.PathLike, what: str) -> Any:
    """JSON from ``path``; a missing, truncated or malformed file is one :class:`CraftError` line."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CraftError(f"{what} '{path}' does not exist") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise CraftError(f"{what} '{path}' is not readable JSON ({type(e).__name__}: {_first_line(e)}); "
                         "delete it to have it made again") from None


# ------------------------------------------------------------------------------ output paths, before work
def _nearest_existing(p: Path) -> Path:
    p = p.absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def _probe_writable(folder: Path, flag: str, target: Path) -> None:
    """Create and remove a scratch file in ``folder`` (the only reliable test, root and odd file systems
    included)."""
    probe = folder / f".craft-write-test.{os.getpid()}.{uuid.uuid4().hex[:8]}"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise CraftError(f"{flag} '{target}' cannot be written: {e.strerror or type(e).__name__} in "
                         f"'{folder}'; choose another place") from None


def _check_links(p: Path, flag: str) -> None:
    """A symbolic link on the way to ``p`` (``p`` included) whose target does not exist is refused: writing
    through it fails at the end of the work ("File exists"), or writes somewhere unexpected."""
    for q in [p, *p.parents]:
        if q.is_symlink() and not q.exists():
            raise CraftError(f"{flag} '{p}': '{q}' is a symbolic link to '{os.readlink(q)}', which does not exist; "
                             f"remove the link, create its target, or choose another {flag}")


def check_out_dir(path: str | os.PathLike, flag: str = "--out") -> Path:
    """Check that the folder ``path`` can be created (or exists) and written; creates nothing."""
    p = Path(path)
    if str(path) == "":
        raise CraftError(f"{flag} is empty: give a folder")
    _check_links(p, flag)
    if p.exists() and not p.is_dir():
        raise CraftError(f"{flag} '{p}' is a file, but a folder is needed here; choose another {flag}")
    base = _nearest_existing(p)
    if not base.is_dir():
        raise CraftError(f"{flag} '{p}' cannot be created: '{base}' is a file, not a folder")
    _probe_writable(base, flag, p)
    return p


def check_out_file(path: str | os.PathLike, flag: str = "--out") -> Path:
    """Check that the file ``path`` can be written (its folder created); creates nothing."""
    p = Path(path)
    if str(path) == "" or p.name in ("", ".", ".."):
        raise CraftError(f"{flag} '{path}' is not a file name")
    _check_links(p, flag)
    if p.is_dir():
        raise CraftError(f"{flag} '{p}' is a folder, but a file name is needed here (e.g. '{p / 'out'}')")
    base = _nearest_existing(p.parent)
    if not base.is_dir():
        raise CraftError(f"{flag} '{p}' cannot be created: '{base}' is a file, not a folder")
    _probe_writable(base, flag, p)
    return p




TEMP_NAME = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.[0-9a-f]{8}\.tmp$")
"""Names of the temporary files and staging folders this module makes: ``.<name>.<pid>.<8 hex>.tmp``."""


@contextmanager
def staged_folder(out: str | os.PathLike, last: tuple[str, ...] = ("results.json",), first: tuple[str, ...] = (),
                  replace: bool = False) -> Iterator[Path]:
    """Write a folder's files into a hidden staging folder beside ``out``, then move them into ``out``.

    Yields the staging folder. On success, without ``replace``, every file is renamed into ``out`` (created if
    needed; sub-folders merged file by file): the names in ``first`` before all others, those in ``last`` after
    all others (the marker that the folder is complete). With ``replace`` the staging folder replaces ``out``
    as a whole (``out`` renamed away, the staging folder renamed to ``out``, the old one removed; if the second
    rename fails the first is undone), so no file of an older output stays beside the new ones; the lock
    file of :func:`own_output` moves with it. On failure the staging folder (and any parent folder this call
    created) is removed and ``out`` is untouched. A symbolic link ``out`` is followed (the link stays).
    """
    out = Path(out)
    if out.is_symlink() and out.exists():
        out = out.resolve()
    created = []
    p = out.parent.absolute()
    while not p.exists():
        created.append(p)
        p = p.parent
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.parent / f".{out.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
        tmp.mkdir()
    except OSError as e:
        raise write_error(out, e) from None
    try:
        yield tmp
        if replace:
            _swap_in(tmp, out)
        else:
            _merge_into(tmp, out, first, last)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        for d in created:  # innermost first
            try:
                d.rmdir()
            except OSError:
                break
        if is_write_failure(e):
            raise write_error(getattr(e, "filename", None) or out, e) from None
        raise
    shutil.rmtree(tmp, ignore_errors=True)


def _merge_into(tmp: Path, out: Path, first: tuple[str, ...], last: tuple[str, ...]) -> None:
    """Move every file of ``tmp`` into ``out`` (sub-folders merged); if a move fails, the files already moved
    are put back as they were (the replaced ones were kept under a second name until the end), so ``out`` is
    either complete or untouched."""
    undo: list[tuple[Path, Path | None]] = []  # (moved-in file, its kept previous version or None)
    made: list[Path] = []
    try:
        _merge_files(tmp, out, first, last, undo, made)
    except BaseException:
        for dst, kept in reversed(undo):
            try:
                if kept is None:
                    dst.unlink(missing_ok=True)
                elif dst.exists() and os.path.samefile(kept, dst):  # never replaced (a rename between two
                    kept.unlink()                                      # links of one file does nothing)
                else:
                    os.replace(kept, dst)
            except OSError:
                pass
        for d in reversed(made):
            try:
                d.rmdir()
            except OSError:
                pass
        raise
    for _, kept in undo:
        if kept is not None:
            kept.unlink(missing_ok=True)


def _merge_files(tmp: Path, out: Path, first, last, undo: list, made: list) -> None:
    if not out.is_dir():
        out.mkdir()
        made.append(out)
    names = sorted(f.name for f in tmp.iterdir())
    order = [n for n in first if n in names] + [n for n in names if n not in first and n not in last] \
        + [n for n in last if n in names]
    for name in order:
        src, dst = tmp / name, out / name
        if src.is_dir() and not src.is_symlink() and (dst.is_dir() or not dst.exists()):
            _merge_files(src, dst, (), (), undo, made)
            continue
        kept = None
        if dst.is_file():
            kept = dst.with_name(f".{name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
            try:
                os.link(dst, kept)
            except OSError:
                shutil.copy2(dst, kept)
        undo.append((dst, kept))
        os.replace(src, dst)


def _swap_in(tmp: Path, out: Path) -> None:
    lock = out / LOCK_NAME
    if lock.exists():  # the same lock file (a second name of it) is in the new folder before it is swapped in
        try:
            os.link(lock, tmp / LOCK_NAME)
        except OSError:
            pass
    if not out.exists():
        os.rename(tmp, out)
        return
    old = out.parent / f".{out.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    os.rename(out, old)
    try:
        os.rename(tmp, out)
    except BaseException:
        os.rename(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)


def check_replaceable(out: str | os.PathLike, allowed: Callable[[str], bool], what: str,
                      flag: str = "--out") -> None:
    """Before work that will replace the folder ``out`` as a whole: every entry of it must be one that work
    makes (``allowed(name)``), so that nothing else of the user's is removed with it; one CraftError line
    naming the others otherwise."""
    out = Path(out)
    if not out.is_dir():
        return
    other = sorted(n.name for n in out.iterdir() if n.name != LOCK_NAME and not TEMP_NAME.match(n.name)
                   and not allowed(n.name))
    if other:
        raise CraftError(f"{flag} '{out}' holds files that are not {what}'s ({', '.join(other[:4])}"
                         f"{', ...' if len(other) > 4 else ''}); it would be replaced as a whole: choose a new or "
                         f"empty folder, or one of an earlier {what}")


# ------------------------------------------------------------------------------ one owner per output
LOCK_NAME = ".craft.lock"
"""The lock file of an output folder (inside it); a file output ``F`` has ``.F.craft.lock`` beside it."""


def pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` runs on this machine."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class OutputLock:
    """An exclusive, non-blocking (or with ``wait``, blocking) lock of one output, held by this process.

    The lock file is opened (created if absent) and locked with ``fcntl.flock``: atomic, and released by the
    kernel when its process ends, however it ends (SIGKILL included), so the lock of a dead run is simply taken
    over. The file holds the owner's pid, host and start time for the message a second run gets. ``release``
    removes the file, then unlocks it; a run that took the file's lock checks that the file is still the one
    at the path (the previous owner may have removed it meanwhile) and tries again if not.
    """

    def __init__(self, path: str | os.PathLike, what: str, flag: str = "--out", wait: bool = False):
        import fcntl
        import socket

        self.path = Path(path)
        self.previous = ""
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            except OSError as e:
                raise write_error(self.path, e) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            except BlockingIOError:
                owner = _read_fd(fd).strip() or "a run that is starting"
                os.close(fd)
                raise CraftError(f"{flag} '{what}' is in use by another craft run ({owner}); wait until it ends or "
                                 f"choose another {flag}") from None
            except OSError:  # no flock on this file system: the lock is the file itself, owned by a live pid
                os.close(fd)
                fd = self._exclusive(flag, what)
                break
            try:
                same = os.path.samestat(os.stat(self.path), os.fstat(fd))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        self.fd = fd
        self.previous = _read_fd(fd).strip()
        try:  # who holds it, for the message a second run gets (the lock itself is the flock)
            os.ftruncate(fd, 0)
            os.pwrite(fd, (f"pid {os.getpid()} on {socket.gethostname()} since "
                           f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n").encode(), 0)
        except OSError:  # e.g. no space left: the lock holds all the same
            pass

    def _exclusive(self, flag: str, what: str) -> int:
        """O_CREAT | O_EXCL on the lock file; one of a dead process of this host is removed first."""
        import socket

        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666)
                return fd
            except FileExistsError:
                owner = self.path.read_text(errors="replace").split()
                dead = (len(owner) >= 4 and owner[0] == "pid" and owner[1].isdigit()
                        and owner[3] == socket.gethostname() and not pid_alive(int(owner[1])))
                if not dead:
                    raise CraftError(f"{flag} '{what}' is in use by another craft run ({' '.join(owner[:4])}); "
                                     f"wait until it ends or choose another {flag}") from None
                self.path.unlink(missing_ok=True)
        raise CraftError(f"{flag} '{what}': could not take its lock '{self.path}'; try again")

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            if os.path.samestat(os.stat(self.path), os.fstat(self.fd)):
                self.path.unlink()
        except OSError:
            pass
        os.close(self.fd)
        self.fd = None

    def __enter__(self) -> "OutputLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _read_fd(fd: int) -> str:
    try:
        return os.pread(fd, 4096, 0).decode(errors="replace")
    except OSError:
        return ""


def clean_stale(out: str | os.PathLike, kind: str = "dir") -> int:
    """Remove the temporary files and staging folders of dead processes left in the output ``out`` (a folder,
    searched through; ``kind="file"``: a file, whose temporary files lie beside it) and beside it. Called by
    its owner (under its lock), so no live run of this output can be writing them. Returns how many."""
    out = Path(out)
    found = [p for p in out.parent.glob(f".{glob_escape(out.name)}.*.tmp")] if out.parent.is_dir() else []
    if kind == "dir" and out.is_dir():
        found += [p for p in out.rglob(".*") if TEMP_NAME.match(p.name) or p.name.startswith(".craft-write-test.")]
    n = 0
    for p in found:
        m = TEMP_NAME.match(p.name) or re.match(r"^\.craft-write-test\.(?P<pid>\d+)\.", p.name)
        if m is None or pid_alive(int(m.group("pid"))):
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        n += 1
    return n


def glob_escape(name: str) -> str:
    """``name`` with glob's special characters escaped."""
    return re.sub(r"([*?\[])", r"[\1]", name)


def lock_file(out: str | os.PathLike, kind: str = "dir") -> Path:
    """Where the lock of the output ``out`` lives: ``out/.craft.lock`` (a folder), ``.NAME.craft.lock`` beside
    the file ``out``."""
    out = Path(out)
    return out / LOCK_NAME if kind == "dir" else out.with_name(f".{out.name}{LOCK_NAME}")


@contextmanager
def own_output(path: str | os.PathLike, flag: str = "--out", kind: str = "dir", wait: bool = False
               ) -> Iterator[Path]:
    """Hold the output ``path`` (``kind``: ``"dir"`` a folder, ``"file"`` a file) for the duration of the block.

    Checks the path (:func:`check_out_dir` / :func:`check_out_file`), creates the folder that holds the lock
    (``path`` for a folder, its parent for a file), takes the lock (:class:`OutputLock`: a second run of the
    same output is one line, exit 2; a lock left by a killed run is taken over), removes temporary files of
    dead processes (:func:`clean_stale`) and yields ``path``. On the way out the lock is released and the
    folders this call created are removed if they are empty, so a run that fails before writing its output
    leaves nothing. ``wait``: block until the current owner releases the output instead of failing.

    A new command adopts it in one line: ``with own_output(args.out):`` around its work.
    """
    p = Path(path)
    (check_out_dir if kind == "dir" else check_out_file)(p, flag)
    folder = p if kind == "dir" else p.parent
    created = []
    q = folder.absolute()
    while not q.exists():
        created.append(q)
        q = q.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise write_error(folder, e) from None
    try:
        lock = OutputLock(lock_file(p, kind), str(p), flag, wait=wait)
    except BaseException:
        _remove_empty(created)
        raise
    try:
        clean_stale(p, kind)
        yield p
    finally:
        lock.release()
        _remove_empty(created)


def _remove_empty(created: list[Path]) -> None:
    for d in created:  # innermost first
        try:
            d.rmdir()
        except OSError:
            break


__all__ = ["atomic_write", "write_bytes", "write_text", "write_json", "save_torch", "load_torch", "read_json",
           "check_out_dir", "check_out_file", "staged_folder", "check_replaceable", "own_output", "OutputLock",
           "clean_stale", "lock_file", "pid_alive", "is_write_failure", "write_error", "LOCK_NAME", "TEMP_NAME"]
