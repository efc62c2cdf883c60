"""Files: written whole or not at all (an interrupted job never leaves a half-written record behind), output
paths made and checked before any work, and input files checked to be what they should be (UTF-8 text, weights).

Every check raises Flux2LabError naming the path and, where a flag gave it, the flag.
"""

from __future__ import annotations

import json
import os
import zipfile
from collections.abc import Callable
from pathlib import Path

from flux2lab.common.errors import Flux2LabError

SAFETENSORS_HEADER_MAX = 100_000_000  # safetensors' own limit on the JSON header, in bytes


def atomic_write(path: str | Path, write: Callable[[Path], object]) -> Path:
    """Call `write(tmp)` on a temporary file beside `path`, then rename it over `path` (atomic on POSIX)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write `text` to `path` atomically."""
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def prepare_output_dir(path: str | Path, flag: str) -> Path:
    """Make output folder `path` (and its parents) now, before any work, so a path that cannot be a folder fails
    at once: a file there or above it, or no permission. `flag` names where the path came from (e.g. "--out")."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        blocker = _file_in_the_way(path) or path
        where = "" if blocker == path else f" lies under {blocker}, which"
        raise Flux2LabError(f"{flag} {path}{where} is a file, not a folder; give a folder path.") from None
    except OSError as e:
        raise Flux2LabError(f"{flag} {path}: cannot make this folder ({e.strerror}); give one you can write.") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise Flux2LabError(f"{flag} {path}: the folder is not writable; give a folder you can write.")
    return path


def check_output_file(path: str | Path, flag: str) -> Path:
    """Output file `path`: its folder is made now (as `prepare_output_dir`) and the path must not be a folder."""
    path = Path(path)
    if path.is_dir():
        raise Flux2LabError(f"{flag} {path} is a folder; give a file path (e.g. {path / 'out.json'}).")
    blocker = _file_in_the_way(path.parent)
    if blocker is not None:
        raise Flux2LabError(f"{flag} {path} lies under {blocker}, which is a file, not a folder; give a path in a "
                            "folder.")
    prepare_output_dir(path.parent, flag)
    return path


def _file_in_the_way(folder: Path) -> Path | None:
    """The file at `folder` or above it that keeps it from being a folder, if any."""
    return next((p for p in (folder, *folder.parents) if p.exists() and not p.is_dir()), None)


def read_text(path: str | Path, what: str) -> str:
    """A UTF-8 text file's content; `what` names it in errors ("recipe file", "--grid file")."""
    path = Path(path)
    if path.is_dir():
        raise Flux2LabError(f"{what} {path} is a folder; give the file itself.")
    if not path.is_file():
        raise Flux2LabError(f"{what} {path} does not exist.")
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise Flux2LabError(f"{what} {path}, line {line}: not UTF-8 text (byte 0x{data[e.start]:02x}); save it as "
                            "UTF-8.") from None


def check_weight_file(path: str | Path, what: str) -> Path:
    """`path` must look like a checkpoint: a torch.save zip, a legacy torch pickle or a safetensors file. Only
    its first bytes (a zip's directory, a safetensors header) are read: a cheap check before any work that
    catches a wrong file given as weights, not a damaged checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise Flux2LabError(f"{what} {path} {'is a folder' if path.is_dir() else 'does not exist'}; give the "
                            "weight file.")
    if zipfile.is_zipfile(path):  # torch.save's format
        return path
    with path.open("rb") as f:
        head = f.read(8)
        if head[:1] == b"\x80":  # a legacy torch.save pickle
            return path
        size = int.from_bytes(head, "little") if len(head) == 8 else 0
        header = f.read(size) if 0 < size <= SAFETENSORS_HEADER_MAX else b""
    try:
        if isinstance(json.loads(header), dict):  # safetensors: the header's size (u64), then the header (JSON)
            return path
    except (UnicodeDecodeError, json.JSONDecodeError):
        pass
    raise Flux2LabError(f"{what} {path} is not a weight file (neither a PyTorch checkpoint nor safetensors); give "
                        "the checkpoint itself.")
