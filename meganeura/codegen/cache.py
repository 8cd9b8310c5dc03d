"""Kernel source cache: one file per emitted source, keyed by a hash of its text and versions.

Files are written atomically (temp file + rename). The first line of each file
records the hash of the rest; a file whose text does not match its name (corrupt,
half-written by a crash, edited) is rebuilt. Loading compiles the source through
Triton's JIT on CUDA or its interpreter on the CPU.

A cache that cannot take new files (read-only, shared, a full disk) is still used: the
kernels it holds are read from it, and the ones it lacks are compiled from memory, with
one warning per directory and process. A path that cannot be a directory at all (a file,
a path under a file) is an error, reported by `check` when a model is made.
"""

from __future__ import annotations

import errno
import hashlib
import importlib.util
import linecache
import os
import shutil
import stat
import sys
import tempfile
import types
from pathlib import Path

import torch
import triton

from ..errors import MeganeuraError

DEFAULT_DIR = Path.home() / ".cache" / "meganeura" / "kernels"
# errors that make a directory no directory at all, rather than one closed to new files
_NOT_A_DIRECTORY = (errno.ENOTDIR, errno.EEXIST, errno.ENAMETOOLONG, errno.ELOOP)
# errors of a directory that is (or could be) there but takes no new files
_CLOSED = (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT)
_warned: set[str] = set()  # directories whose read-only warning this process printed


def interpreter_active() -> bool:
    """Triton's interpreter is chosen when triton is imported (TRITON_INTERPRET=1)."""
    import triton.language.standard as std

    return type(std.sum).__name__ == "InterpretedFunction"


def interpreter_mismatch(interpreted: bool) -> str:
    want = "1" if interpreted else "0 (or unset)"
    return (f"running kernels on {'the CPU' if interpreted else 'CUDA'} needs "
            f"TRITON_INTERPRET={want} in the environment before triton is imported; this "
            f"process imported it {'without' if interpreted else 'with'} it")


def _warn(directory: Path, what: str) -> None:
    """One warning line per cache directory and process."""
    key = str(directory)
    if key not in _warned:
        _warned.add(key)
        print(f"warning: kernel cache {directory} {what}", file=sys.stderr, flush=True)


class KernelCache:
    """tag: what else a kernel's text depends on (the caller's version), kept in every key."""

    def __init__(self, directory: str | Path | None = None, tag: str = ""):
        self.directory = Path(directory) if directory is not None else DEFAULT_DIR
        self.versions = ", ".join(x for x in (tag, f"triton {triton.__version__}",
                                              f"torch {torch.__version__}") if x)
        self._loaded: dict[tuple[str, str, bool], object] = {}
        self.hits = self.misses = self.rebuilt = 0
        self._writable: bool | None = None  # None: not tried yet

    def key(self, source: str) -> str:
        return hashlib.sha256(f"{self.versions}\n{source}".encode()).hexdigest()[:32]

    def path(self, source: str) -> Path:
        return self.directory / f"k_{self.key(source)}.py"

    def _text(self, source: str) -> str:
        body = f"# {self.versions}\n{source}"
        return f"# sha256 {hashlib.sha256(body.encode()).hexdigest()}\n{body}"

    def store(self, source: str) -> Path | None:
        """The cached file of `source`, written unless an intact copy is already there; None
        when the directory cannot take it (the kernel is then loaded from memory). Only a
        regular file is read, and no more of it than the source takes."""
        path, text = self.path(source), self._text(source)
        data = text.encode()
        try:
            st = os.lstat(path)
            if stat.S_ISREG(st.st_mode) and st.st_size == len(data):
                with open(path, "rb") as f:
                    if f.read(len(data) + 1) == data:
                        self.hits += 1
                        return path
            self.rebuilt += 1  # present but not what its name promises
            if not self.writable:
                return None
            if stat.S_ISDIR(st.st_mode):
                shutil.rmtree(path)
            else:
                os.unlink(path)
        except FileNotFoundError:
            self.misses += 1
        except OSError as e:  # this entry cannot be read or replaced: it alone from memory
            if e.errno in _NOT_A_DIRECTORY:
                return self._closed(e)
            _warn(self.directory, f"entry {path.name} cannot be read or replaced "
                                  f"({e.strerror or e}): that kernel is compiled from memory")
            return None
        return self._put(path, data)

    def _put(self, path: Path, data: bytes) -> Path | None:
        """Writes `data` as `path` atomically; None when the directory takes no new files."""
        if not self.writable:
            return None
        tmp = None
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=".tmp_", suffix=path.suffix)
            with os.fdopen(fd, "wb") as f:
                self._write(f, data)
            os.replace(tmp, path)
            tmp = None
        except OSError as e:
            return self._closed(e)
        finally:
            if tmp is not None:
                try:
                    os.unlink(tmp)  # nothing half-written stays
                except OSError:
                    pass
        return path

    # ---- other artifacts keyed by the caller (extracted plans) ---------------------------

    def blob_path(self, key: str) -> Path:
        return self.directory / f"p_{key}.bin"

    def get_blob(self, key: str, limit: int = 1 << 30, owned: bool = False) -> bytes | None:
        """The bytes stored under `key`, or None: absent, not a regular file, larger than
        `limit`, unreadable, or not matching the hash written before them; owned: also
        None unless the file is this user's and no one else may write it."""
        path = self.blob_path(key)
        try:
            st = os.lstat(path)
            if not stat.S_ISREG(st.st_mode) or st.st_size > limit:
                return None
            if owned and (st.st_uid != os.getuid() or st.st_mode & 0o022):
                return None
            with open(path, "rb") as f:
                data = f.read(limit + 1)
        except OSError:
            return None
        digest, _, body = data.partition(b"\n")
        return body if digest == hashlib.sha256(body).hexdigest().encode() else None

    def put_blob(self, key: str, body: bytes) -> Path | None:
        """Stores `body` under `key` (atomically, after its hash); None when the directory
        takes no new files."""
        return self._put(self.blob_path(key), hashlib.sha256(body).hexdigest().encode() +
                         b"\n" + body)

    @staticmethod
    def _write(f, data: bytes) -> None:
        f.write(data)

    @property
    def writable(self) -> bool:
        return self._writable is not False

    def _closed(self, e: OSError) -> None:
        """The directory takes no new files (e.g. read-only, full): from memory from now on."""
        if e.errno in _NOT_A_DIRECTORY:
            raise MeganeuraError(f"kernel cache {self.directory} cannot be a directory: "
                                 f"{e.strerror or e}") from None
        self._writable = False
        _warn(self.directory, f"takes no new files ({e.strerror or e}): kernels it lacks are "
                              f"compiled from memory in this process")
        return None

    def check(self) -> None:
        """Made when a model is made: a cache directory that is not there and cannot be made
        (a file, a path under a file, a file system that has none) raises MeganeuraError;
        one that is there but takes no new files is used read-only (one warning)."""
        d = self.directory
        try:
            st = os.stat(d)
        except (FileNotFoundError, NotADirectoryError):
            st = None
        except OSError as e:
            raise MeganeuraError(f"kernel cache {d} cannot be read: {e.strerror or e}") from None
        if st is not None and not stat.S_ISDIR(st.st_mode):
            raise MeganeuraError(f"kernel cache {d} exists and is not a directory")
        if st is None:
            try:
                d.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                if e.errno in _CLOSED:  # e.g. under a read-only home: kernels from memory
                    self._closed(e)
                    return
                raise MeganeuraError(f"kernel cache directory {d} cannot be made: "
                                     f"{e.strerror or e}") from None
        try:
            fd, tmp = tempfile.mkstemp(dir=d, prefix=".probe_")
            os.close(fd)
            os.unlink(tmp)
            self._writable = True
        except OSError as e:
            self._closed(e)

    def load(self, source: str, entry: str, interpreted: bool):
        """The kernel `entry` of `source`, ready to launch on the chosen backend."""
        k = (source, entry, interpreted)
        if k in self._loaded:
            return self._loaded[k]
        if interpreted != interpreter_active():
            raise MeganeuraError(interpreter_mismatch(interpreted))
        path = self.store(source)
        if path is not None:
            spec = importlib.util.spec_from_file_location(f"meganeura_kernels.{path.stem}", path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        else:
            module = self._from_memory(source)
        fn = triton.jit(getattr(module, entry))
        self._loaded[k] = fn
        return fn

    def _from_memory(self, source: str) -> types.ModuleType:
        """The kernel's module made from its text, which the line cache keeps under a name no
        file has (Triton's JIT reads a kernel's source through inspect, as from a file)."""
        text = self._text(source)
        name = f"<meganeura kernel {self.key(source)}>"
        linecache.cache[name] = (len(text), None, text.splitlines(True), name)
        module = types.ModuleType(f"meganeura_kernels.m_{self.key(source)}")
        module.__file__ = name
        exec(compile(text, name, "exec"), module.__dict__)  # noqa: S102 (our generated source)
        return module

    def copy_to(self, sources: list[str], directory: str | Path) -> list[Path]:
        """Writes the files of `sources`, as the cache holds them, into `directory` for
        reading (--emit-dir), replacing the kernels an earlier emit left there."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        for old in d.glob("k_*.py"):
            old.unlink()
        out = []
        for s in dict.fromkeys(sources):
            dst = d / self.path(s).name
            fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp_", suffix=".py")
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(self._text(s).encode())
                os.replace(tmp, dst)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
            out.append(dst)
        return out
