"""Kernel source cache: one file per emitted source, keyed by a hash of its text and versions.

Files are written atomically (temp file + rename). The first line of each file
records the hash of the rest; a file whose text does not match its name (corrupt,
half-written by a crash, edited) is rebuilt. Loading compiles the source through
Triton's JIT on CUDA or its interpreter on the CPU.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import stat
import tempfile
from pathlib import Path

import torch
import triton

from ..errors import MeganeuraError

DEFAULT_DIR = Path.home() / ".cache" / "meganeura" / "kernels"


def interpreter_active() -> bool:
    """Triton's interpreter is chosen when triton is imported (TRITON_INTERPRET=1)."""
    import triton.language.standard as std

    return type(std.sum).__name__ == "InterpretedFunction"


class KernelCache:
    """tag: what else a kernel's text depends on (the caller's version), kept in every key."""

    def __init__(self, directory: str | Path | None = None, tag: str = ""):
        self.directory = Path(directory) if directory is not None else DEFAULT_DIR
        self.versions = ", ".join(x for x in (tag, f"triton {triton.__version__}",
                                              f"torch {torch.__version__}") if x)
        self._loaded: dict[tuple[str, str, bool], object] = {}
        self.hits = self.misses = self.rebuilt = 0

    def key(self, source: str) -> str:
        return hashlib.sha256(f"{self.versions}\n{source}".encode()).hexdigest()[:32]

    def path(self, source: str) -> Path:
        return self.directory / f"k_{self.key(source)}.py"

    def _text(self, source: str) -> str:
        body = f"# {self.versions}\n{source}"
        return f"# sha256 {hashlib.sha256(body.encode()).hexdigest()}\n{body}"

    def store(self, source: str) -> Path:
        """Writes the source file unless an intact copy is already there. Only a regular file
        is read, and no more of it than the source takes: anything else is replaced."""
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
            os.unlink(path)
        except FileNotFoundError:
            self.misses += 1
        except OSError as e:
            raise MeganeuraError(f"kernel cache {self.directory}: cannot read or replace {path.name}: "
                                 f"{e.strerror}") from None
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=".tmp_", suffix=".py")
        except OSError as e:
            raise MeganeuraError(f"kernel cache directory {self.directory} is not writable: "
                                 f"{e.strerror or e}") from None
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return path

    def check_writable(self) -> None:
        """The cache directory exists (made if needed) and takes new files; MeganeuraError if not."""
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=".probe_")
            os.close(fd)
            os.unlink(tmp)
        except OSError as e:
            raise MeganeuraError(f"kernel cache directory {self.directory} is not writable: "
                                 f"{e.strerror or e}") from None

    def load(self, source: str, entry: str, interpreted: bool):
        """The kernel `entry` of `source`, ready to launch on the chosen backend."""
        k = (source, entry, interpreted)
        if k in self._loaded:
            return self._loaded[k]
        if interpreted != interpreter_active():
            want = "1" if interpreted else "0 (or unset)"
            raise MeganeuraError(f"running kernels on {'the CPU' if interpreted else 'CUDA'} needs "
                                 f"TRITON_INTERPRET={want} in the environment before triton is "
                                 f"imported")
        path = self.store(source)
        spec = importlib.util.spec_from_file_location(f"meganeura_kernels.{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        fn = triton.jit(getattr(module, entry))
        self._loaded[k] = fn
        return fn

    def copy_to(self, sources: list[str], directory: str | Path) -> list[Path]:
        """Copies the cached files of `sources` out for reading (--emit-dir), replacing the
        kernels an earlier emit left there."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        for old in d.glob("k_*.py"):
            old.unlink()
        out = []
        for s in dict.fromkeys(sources):
            dst = d / self.path(s).name
            shutil.copyfile(self.store(s), dst)
            out.append(dst)
        return out
