"""The process's memory allocator: mimalloc preloaded into the long-running commands, or
glibc's malloc told to keep what it frees. No torch here: a command re-executes itself
under mimalloc (``use_fast_allocator``) before it imports anything heavy, so the switch costs
a Python start-up, not a second ``import torch``."""

from __future__ import annotations

import importlib.metadata
import os
import sys
from collections.abc import Mapping
from pathlib import Path

from transformer.errors import UserError


def keep_freed_memory() -> bool:
    """Ask glibc to keep freed memory in the process instead of returning it to the OS.

    Tensors over 32 MiB (the logits of a 4k-token batch over an 8k vocabulary are 128 MiB)
    otherwise get fresh pages from the kernel at every step, and the page faults on first
    touch cost ~10% of a CPU training step; Intel's advice for the same cost is to swap in
    jemalloc or tcmalloc. Memory is still reused inside the process, but the resident size
    never shrinks and grows with fragmentation (the Multi30k recipe: 5.8 against 4.5 GB after
    200 updates, 9.2 GB after the hour). Returns False where this is not glibc."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # from <malloc.h>
    return bool(mallopt(m_mmap_max, 0)) and bool(mallopt(m_trim_threshold, 2**31 - 1))


ALLOCATOR_ENV = "TRANSFORMER_ALLOCATOR"  # auto (mimalloc where installed) | mimalloc | system
ALLOCATORS = ("auto", "mimalloc", "system")


def mimalloc_library() -> str | None:
    """libmimalloc.so of the ``cmeel-mimalloc`` wheel (a dependency on Linux), if installed."""
    try:
        files = importlib.metadata.files("cmeel-mimalloc") or []
    except importlib.metadata.PackageNotFoundError:
        return None
    found = [f.locate() for f in files if f.name == "libmimalloc.so"]
    return str(found[0]) if found and Path(found[0]).is_file() else None


def allocator_env(env: Mapping[str, str], library: str | None) -> dict[str, str] | None:
    """The environment to run this process again in, with mimalloc preloaded; None to go on.

    glibc's malloc fragments under training's stream of differently sized large tensors: the
    Multi30k recipe's resident size reached 4 GB within 3 minutes (BENCHMARKS.md, soak).
    mimalloc, preloaded (no root: the library comes from a wheel), holds it near 1.5 GB and
    trains faster (no page faults on reused pages)."""
    choice = env.get(ALLOCATOR_ENV, "auto")
    if choice not in ALLOCATORS:
        raise UserError(f"{ALLOCATOR_ENV}={choice!r}: expected one of {', '.join(ALLOCATORS)}")
    preloaded = env.get("LD_PRELOAD", "")
    if choice == "system" or "mimalloc" in preloaded:
        return None
    if library is None:
        if choice == "mimalloc":
            raise UserError(f"{ALLOCATOR_ENV}=mimalloc but it is not installed (pip install cmeel-mimalloc)")
        return None
    # freed pages stay with the process (no purge): 4-12% faster steps than mimalloc's 10 ms
    # purge delay, +5% resident memory (BENCHMARKS.md); a MIMALLOC_PURGE_DELAY given wins
    return {"MIMALLOC_PURGE_DELAY": "-1", **env, "LD_PRELOAD": f"{library} {preloaded}".strip()}


def use_fast_allocator() -> None:
    """Run this command again at once with mimalloc preloaded (same pid, arguments and
    streams), unless it already is, TRANSFORMER_ALLOCATOR=system, or mimalloc is missing.
    Long-running commands (training, serving) call it before anything else."""
    if not sys.platform.startswith("linux"):
        return
    env = allocator_env(os.environ, mimalloc_library())
    if env is not None:
        sys.stdout.flush()
        os.execve(sys.executable, sys.orig_argv, env)


def active_allocator() -> str:
    """ "mimalloc" when it is mapped into this process, else "system"."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return "system"
    return "mimalloc" if "libmimalloc" in maps else "system"
