"""Small file helpers: atomic writes (no partial artifacts) and content hashes for manifests."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        try:
            yield tmp_path
        except OSError as e:
            if e.filename is None:  # a failed write (ENOSPC, EFBIG) names no file: name the one meant
                e.filename = str(path)
            raise
        if tmp_path.exists():
            os.chmod(tmp_path, 0o644)  # mkstemp creates 0600; artifacts should be readable like any file
            fsync_tree(tmp_path)
        os.replace(tmp_path, path)
        fsync_dir(path.parent)
    finally:
        tmp_path.unlink(missing_ok=True)


def fsync_dir(path: str | os.PathLike) -> None:
    """Flush a folder's entries so a rename into it survives a power cut (no-op where unsupported)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems / platforms refuse fsync on a directory
    finally:
        os.close(fd)


def fsync_tree(path: str | os.PathLike) -> None:
    """fsync every file under ``path`` (or ``path`` itself) and its folders before it is renamed into
    place, so a power cut cannot leave a renamed but empty file."""
    path = Path(path)
    if path.is_file():
        with open(path, "rb") as f:
            os.fsync(f.fileno())
        return
    for root, _dirs, files in os.walk(path):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(root)


def write_json_atomic(path: str | os.PathLike, data: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_dir(path: str | os.PathLike, patterns: tuple[str, ...] = ("*.safetensors", "*.json")) -> str:
    """Hash of a folder's weight and config files (names and contents), order-independent."""
    root = Path(path)
    h = hashlib.sha256()
    files = sorted({p for pat in patterns for p in root.glob(pat) if p.is_file()})
    for p in files:
        h.update(p.name.encode())
        h.update(sha256_file(p).encode())
    return h.hexdigest()


def write_bytes_atomic(path: str | os.PathLike, data: bytes | str) -> Path:
    """Write ``data`` (str as UTF-8) so readers never see a half-written file."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
    return Path(path)


def read_folder_manifest(folder: str | os.PathLike, filename: str, what: str, hint: str) -> dict:
    """JSON manifest of an artifact-like folder; one-line ModelLoadError when missing or broken."""
    from saq_deploy.errors import ModelLoadError

    folder = Path(folder)
    mf = folder / filename
    if not folder.is_dir() or not mf.exists():
        raise ModelLoadError(f"'{folder}' is not {what} (no {filename}); {hint}")
    try:
        return json.loads(mf.read_text())
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"'{mf}' is not valid JSON ({e})") from e


def canonical_safetensors(tensors: dict, metadata: dict[str, str] | None = None) -> bytes:
    """safetensors bytes whose header is the same for the same tensors and metadata in every process.

    The library lays out the tensor data, but it keeps the metadata in a hash map whose iteration
    order changes from process to process, so identical tensors got different file hashes (and every
    manifest hash downstream differed). We keep its data section and rewrite only the JSON header
    with sorted keys, padded to 8 bytes with spaces as the format requires."""
    import struct

    from safetensors.torch import save

    raw = save(tensors, metadata=metadata)
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    if "__metadata__" in header:
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + raw[8 + n:]


def save_safetensors(tensors: dict, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> Path:
    """Write ``tensors`` as byte-reproducible safetensors, atomically (temp file, fsync, rename)."""
    return write_bytes_atomic(path, canonical_safetensors(tensors, metadata))


SEAL_KEY = "manifest_sha256"


def _manifest_digest(manifest: dict) -> str:
    body = {k: v for k, v in manifest.items() if k != SEAL_KEY}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":"), default=str).encode()).hexdigest()


def seal_manifest(manifest: dict) -> dict:
    """``manifest`` plus a hash of its own canonical JSON, so an edited field (e.g. the parity
    thresholds an engine carries) is caught by ``check_seal`` instead of changing behaviour."""
    return {**manifest, SEAL_KEY: _manifest_digest(json.loads(json.dumps(manifest, default=str)))}


def check_seal(manifest: dict, path: str | os.PathLike, remedy: str) -> None:
    from saq_deploy.errors import ModelLoadError

    if manifest.get(SEAL_KEY) != _manifest_digest(manifest):
        raise ModelLoadError(f"'{path}' was edited or made by an older saq-deploy (its {SEAL_KEY} does not "
                             f"match its content); {remedy}")


def check_writable(path: str | os.PathLike) -> None:
    """Raise the OSError a later write of ``path`` would meet (EACCES, EROFS, ENOTDIR), by creating
    and removing a temp file in its nearest existing folder; creates nothing that stays."""
    import errno

    folder = Path(path).parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(folder))
    fd, probe = tempfile.mkstemp(prefix=f".{Path(path).name}.", suffix=".tmp", dir=folder)
    os.close(fd)
    os.unlink(probe)


def publish_mode(folder: str | os.PathLike) -> None:
    """Give a ``mkdtemp`` folder (always 0700) the mode a plain ``mkdir`` would (0777 & ~umask)
    before it is renamed into place, so a shared engine or export folder is readable as usual."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)


def owned_temp_prefix(prefix: str) -> str:
    """``mkdtemp`` prefix that names this process (``<prefix>pid<PID>-``), so a later run can tell a
    killed run's leftover from a live concurrent run's work in progress (see remove_stale_temps)."""
    return f"{prefix}pid{os.getpid()}-"


def remove_stale_temps(parent: str | os.PathLike, prefixes: tuple[str, ...], why: str,
                       note: Any = None) -> list[Path]:
    """Remove temp folders ``<prefix>pid<PID>-<random>`` in ``parent`` whose process is gone (kill -9,
    power cut: no ``finally`` ran) and say so on ``note`` (default: stderr). Only the renamed final
    folder is ever read, so they are garbage. ``<prefix><random>`` without a PID comes from an
    older saq-deploy and is removed too; a folder of a live process is kept. Returns the removed."""
    import re
    import shutil
    import sys

    # mkdtemp's random part is [a-z0-9_] only: anchored, a "-" after it is another output's temp
    # (engine vs engine-fp16), never ours
    pats = [re.compile(re.escape(p) + r"(?:pid(\d+)-)?[a-z0-9_]+") for p in prefixes]
    removed = []
    for entry in sorted(Path(parent).iterdir()) if Path(parent).is_dir() else []:
        m = next((m for p in pats if (m := p.fullmatch(entry.name))), None)
        if m is None or not entry.is_dir() or (m.group(1) and _pid_alive(int(m.group(1)))):
            continue
        shutil.rmtree(entry, ignore_errors=True)
        removed.append(entry)
        line = f"removed stale temp folder {entry} from {why}"
        if note is not None:
            note(line)
        else:
            print(line, file=sys.stderr)
    return removed


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    if os.path.isdir("/proc/self"):
        # kill(pid, 0) also answers for a thread id (freed PIDs are soon reused as thread ids on a
        # busy machine): only a thread-group leader that is not a zombie (killed, not yet reaped) counts
        try:
            lines = Path(f"/proc/{pid}/status").read_text().splitlines()
        except OSError:
            return False
        fields = dict(line.split(":", 1) for line in lines if ":" in line)
        return fields.get("Tgid", "").strip() == str(pid) and not fields.get("State", "").strip().startswith("Z")
    try:
        os.kill(pid, 0)  # signal 0: existence check only
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    except OSError:
        return False
    return True


def name_intended(exc: OSError, tmp: str | os.PathLike, final: str | os.PathLike) -> OSError:
    """A write that failed inside a temp folder (disk full, file size limit) names no file, or a file
    in the hidden temp folder: make it name the file (or folder) the user asked for. Returns ``exc``."""
    if exc.filename is None:
        exc.filename = str(final)
    else:
        try:
            exc.filename = str(Path(final) / Path(os.fspath(exc.filename)).relative_to(tmp))
        except ValueError:  # a file outside the temp folder already names itself
            pass
    return exc
