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
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterable, Iterator

from craft.errors import CraftError


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> Path:
    """Call ``write(binary file)`` on a temporary file beside ``path``, then rename it to ``path``.

    The folder is created if needed; the file gets the usual umask-based mode; on any error (including
    KeyboardInterrupt) the temporary file is removed and ``path`` is untouched. Returns ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


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


def check_out_dir(path: str | os.PathLike, flag: str = "--out") -> Path:
    """Check that the folder ``path`` can be created (or exists) and written; creates nothing."""
    p = Path(path)
    if str(path) == "":
        raise CraftError(f"{flag} is empty: give a folder")
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
    if p.is_dir():
        raise CraftError(f"{flag} '{p}' is a folder, but a file name is needed here (e.g. '{p / 'out'}')")
    base = _nearest_existing(p.parent)
    if not base.is_dir():
        raise CraftError(f"{flag} '{p}' cannot be created: '{base}' is a file, not a folder")
    _probe_writable(base, flag, p)
    return p




@contextmanager
def staged_folder(out: str | os.PathLike, last: tuple[str, ...] = ("results.json",)) -> Iterator[Path]:
    """Write a folder's files into a hidden staging folder beside ``out``, then move them into ``out``.

    Yields the staging folder. On success every file is renamed into ``out`` (created if needed), the names in
    ``last`` after all others (the marker that the folder is complete). On failure the staging folder (and any
    parent folder this call created) is removed and ``out`` is untouched.
    """
    out = Path(out)
    created = []
    p = out.parent.absolute()
    while not p.exists():
        created.append(p)
        p = p.parent
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    tmp.mkdir()
    try:
        yield tmp
        out.mkdir(exist_ok=True)
        names = sorted(f.name for f in tmp.iterdir())
        for name in [n for n in names if n not in last] + [n for n in last if n in names]:
            if (tmp / name).is_dir() and (out / name).is_dir():
                shutil.rmtree(out / name)  # a folder of the new output replaces the old one whole
            os.replace(tmp / name, out / name)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for d in created:  # innermost first
            try:
                d.rmdir()
            except OSError:
                break
        raise
    shutil.rmtree(tmp, ignore_errors=True)


__all__ = ["atomic_write", "write_bytes", "write_text", "write_json", "save_torch", "load_torch", "read_json",
           "check_out_dir", "check_out_file", "staged_folder"]
