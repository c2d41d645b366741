"""Building sinkquant's C++ extension (sinkquant/csrc) with `torch.utils.cpp_extension.load`, once per
machine and instruction set.

The build name is a hash of what the binary depends on: the bytes of every source and header, the
compiler and linker flags, the ISA and the torch version. Editing a source therefore builds a new
extension, and a cached one is never loaded for different sources; there is no version number to bump.
Builds live where torch keeps its JIT extensions (`$TORCH_EXTENSIONS_DIR`, else
~/.cache/torch_extensions/py3X_cpu), one folder per build name.

Two processes must not compile into one folder at once, and torch's own guard (an empty `lock` file
that its `FileBaton` waits on for as long as it exists) stays behind when a build is killed, which
would make every later process wait forever. So `cached_build` holds an `fcntl.flock` lock of its own
while torch builds: the kernel drops it when its process dies, a waiting process gives up after
`BUILD_TIMEOUT_S`, and a torch `lock` file found while holding it is stale and removed.

A build that fails (no compiler, no ninja, a compile error) leaves a marker file `<name>.failed` beside
the build folders, holding the reason: the first process warns, later ones see the marker and use
PyTorch's kernels without a word. Deleting the marker, or any change to the sources, flags or torch
version (a new name), tries again.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TypeVar

import torch

logger = logging.getLogger(__name__)

#: the C++ sources, in sinkquant/csrc
CSRC = Path(__file__).resolve().parent.parent / "csrc"
#: compiled into the module: one file, so the large torch headers are parsed once per build
SOURCES = ("extension.cpp",)
#: the kernels, included by extension.cpp: not compiled apart, but part of the build name
HEADERS = ("bf16.h", "gemv.h", "kv_dequant.h")
ISA_FLAGS = {
    "avx2": ("-mavx2", "-mfma"),
    "avx512": ("-mavx2", "-mfma", "-mavx512f", "-mavx512bw"),
}
LDFLAGS = ("-fopenmp",)
#: seconds a process waits for another one's build of the same extension before using PyTorch's
#: kernels; a first build takes well under a minute, so this only ends a wait on a hung build
BUILD_TIMEOUT_S = 600.0
#: seconds between two tries of the build lock while another process holds it
LOCK_POLL_S = 0.25
#: sinkquant's own lock file in a build folder (torch's is `lock`)
LOCK_NAME = "sinkquant.lock"

T = TypeVar("T")


def cflags(isa: str) -> list[str]:
    """The compiler flags of the `isa` build. -ffp-contract=off: the KV dequantization rounds the
    multiply and the add one at a time, as torch's ops do, so its numbers match them bit for bit (the
    matrix-vector product asks for its fused multiply-adds explicitly)."""
    return ["-O3", *ISA_FLAGS[isa], "-ffp-contract=off", "-fopenmp"]


def source_files() -> list[Path]:
    """Every file the extension is built from: the sources, then the headers."""
    return [CSRC / name for name in (*SOURCES, *HEADERS)]


def build_name(
    isa: str,
    files: Iterable[Path] | None = None,
    compile_flags: Sequence[str] | None = None,
    link_flags: Sequence[str] | None = None,
) -> str:
    """`sinkquant_cpu_<isa>_<12 hex digits>`: the digits from a sha256 of the files' names and bytes
    (default: `source_files()`), the flags (default: this ISA's), the ISA and the torch version."""
    digest = hashlib.sha256()
    for path in files if files is not None else source_files():
        data = Path(path).read_bytes()
        digest.update(f"{Path(path).name}\0{len(data)}\0".encode())
        digest.update(data)
    flags = [
        isa,
        torch.__version__,
        *(cflags(isa) if compile_flags is None else compile_flags),
        "--link",
        *(LDFLAGS if link_flags is None else link_flags),
    ]
    digest.update("\0".join(flags).encode())
    return f"sinkquant_cpu_{isa}_{digest.hexdigest()[:12]}"


def cache_root() -> Path:
    """The folder that holds the build folders and failure markers: `$TORCH_EXTENSIONS_DIR` where set
    (as torch uses it), else torch's per-user cache folder for this Python's CPU extensions."""
    explicit = os.environ.get("TORCH_EXTENSIONS_DIR")
    if explicit:
        return Path(explicit)
    from torch.utils.cpp_extension import get_default_build_root

    python = f"py{sys.version_info.major}{sys.version_info.minor}{getattr(sys, 'abiflags', '')}"
    return Path(get_default_build_root()) / f"{python}_cpu"


def failure_marker(name: str, root: Path | None = None) -> Path:
    """The file that records a failed build of `name` (its text: the reason)."""
    return (cache_root() if root is None else root) / f"{name}.failed"


def load_extension(isa: str):
    """The compiled extension for `isa`, built here on first use; None where it cannot be built (said
    once per machine) or another process's build did not finish within `BUILD_TIMEOUT_S`."""
    name = build_name(isa)
    return cached_build(name, lambda build_dir: _torch_load(name, build_dir, isa))


def _torch_load(name: str, build_dir: Path, isa: str):
    from torch.utils.cpp_extension import load

    return load(
        name=name,
        sources=[str(CSRC / source) for source in SOURCES],
        extra_cflags=cflags(isa),
        extra_ldflags=list(LDFLAGS),
        build_directory=str(build_dir),
        verbose=False,
    )


def cached_build(
    name: str,
    build: Callable[[Path], T],
    root: Path | None = None,
    timeout: float = BUILD_TIMEOUT_S,
) -> T | None:
    """`build(build_dir)` under this machine's build lock of `name`, or None: when a failure marker
    says an earlier try failed (no warning), when the lock stays taken for `timeout` seconds, or when
    `build` raises (a warning, and a marker so that later processes skip it)."""
    root = cache_root() if root is None else root
    marker = failure_marker(name, root)
    if marker.exists():
        logger.debug("sinkquant: %s failed to build before (%s); using PyTorch's kernels", name, marker)
        return None
    build_dir = root / name
    try:
        build_dir.mkdir(parents=True, exist_ok=True)
        lock = _acquire_lock(build_dir / LOCK_NAME, timeout)
    except OSError as exc:  # an unwritable cache: nowhere to build or to leave a marker
        warnings.warn(
            f"sinkquant: cannot build in {build_dir} ({exc}); using PyTorch's kernels", stacklevel=3
        )
        return None
    if lock is None:
        warnings.warn(
            f"sinkquant: another process has been building {build_dir} for over {timeout:.0f} s; "
            "using PyTorch's kernels in this one",
            stacklevel=3,
        )
        return None
    try:
        if marker.exists():  # the build this process waited for failed, and that process warned
            logger.debug("sinkquant: %s failed to build in another process (%s)", name, marker)
            return None
        _remove_stale_torch_lock(build_dir)
        try:
            return build(build_dir)
        except Exception as exc:  # no compiler, no ninja, a build error: PyTorch's kernels still work
            _record_failure(marker, exc)
            return None
    finally:
        os.close(lock)  # releases the flock


def _acquire_lock(path: Path, timeout: float) -> int | None:
    """An open descriptor of `path` holding an exclusive flock, or None after `timeout` seconds."""
    import fcntl

    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    deadline = time.monotonic() + timeout
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            left = deadline - time.monotonic()
            if left <= 0:
                os.close(fd)
                return None
            time.sleep(min(LOCK_POLL_S, left))


def _remove_stale_torch_lock(build_dir: Path) -> None:
    """Torch's `lock` file in `build_dir`, found while this process holds sinkquant's lock: no other
    sinkquant process is building, so a killed build left it, and torch would wait on it forever."""
    stale = build_dir / "lock"
    if stale.exists():
        stale.unlink()
        warnings.warn(f"sinkquant: removed {stale}, left by a build that did not finish", stacklevel=4)


def _record_failure(marker: Path, exc: Exception) -> None:
    reason = " ".join(str(exc).split()) or type(exc).__name__
    try:
        marker.write_text(f"{type(exc).__name__}: {reason}\n")
        retry = f"not tried again on this machine until {marker} is deleted"
    except OSError:
        retry = "tried again by the next process"
    warnings.warn(
        f"sinkquant: could not build the fused integer kernel ({reason[:200]}); using PyTorch's kernels "
        f"({retry})",
        stacklevel=4,
    )
