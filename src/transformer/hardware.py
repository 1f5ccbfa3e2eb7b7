"""What this machine runs fast, found once per process: CPU instruction sets, CUDA and bf16.

Defaults that depend on the hardware (``precision: auto``, ``onednn_linear: auto``) read it
here, so no user needs to know the CPU's flags. bf16 counts as native on x86 CPUs with
``avx512_bf16`` or AMX (oneDNN's bf16 kernels), and on CUDA devices that support it; on any
other CPU bf16 autocast runs emulated (10.8x slower than fp32 on an AVX2 AMD EPYC), so
``auto`` means fp32 there. The caps a user can set (``ONEDNN_MAX_CPU_ISA``,
``ATEN_CPU_CAPABILITY``) are honoured, which is how benchmarks emulate a lower class.
"""

from __future__ import annotations

import functools
import logging
import os
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from transformer.config import setting
from transformer.errors import UserError

log = logging.getLogger(__name__)

CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")  # the ones our choices depend on
# oneDNN's ISA names from low to high; bf16 is native from AVX512_CORE_BF16 up
ONEDNN_ISAS = (
    "SSE41",
    "AVX",
    "AVX2",
    "AVX2_VNNI",
    "AVX2_VNNI_2",
    "AVX512_CORE",
    "AVX512_CORE_VNNI",
    "AVX512_CORE_BF16",
    "AVX10_1_512",
    "AVX512_CORE_FP16",
    "AVX10_1_512_AMX",
    "AVX512_CORE_AMX",
    "AVX10_1_512_AMX_FP16",
    "AVX512_CORE_AMX_FP16",
)


@dataclass(frozen=True)
class Hardware:
    """The facts defaults are chosen from; ``to_dict`` goes into results.json and the run card."""

    machine: str  # platform.machine(): x86_64, aarch64, arm64
    cpu_flags: tuple[str, ...]  # those of CPU_FLAGS the CPU reports
    aten_capability: str  # torch's kernel level: DEFAULT, AVX2, AVX512 (ATEN_CPU_CAPABILITY caps it)
    onednn_max_isa: str | None  # ONEDNN_MAX_CPU_ISA when set
    onednn_bf16: bool  # torch's own check that oneDNN runs bf16 here (under the caps above)
    threads: int  # torch intra-op threads
    cuda: str | None = None  # device name of cuda:0
    cuda_bf16: bool = False

    @property
    def cpu_bf16_native(self) -> bool:
        """bf16 matmuls in hardware: avx512_bf16 or AMX, not capped below them by the environment."""
        has = any(f in self.cpu_flags for f in ("avx512_bf16", "amx_bf16"))
        capped = (
            self.onednn_max_isa is not None
            and self.onednn_max_isa in ONEDNN_ISAS[: ONEDNN_ISAS.index("AVX512_CORE_BF16")]
        )
        return has and self.onednn_bf16 and not capped

    @property
    def cpu_class(self) -> str:
        """The class figures are reported per: amx, avx512_bf16, avx512, avx2 or the machine name."""
        capped_avx2 = self.aten_capability == "AVX2" or (self.onednn_max_isa or "").startswith(("AVX2", "AVX", "SSE"))
        if "avx512f" in self.cpu_flags and not capped_avx2:
            if not self.cpu_bf16_native:
                return "avx512"
            return "amx" if "amx_bf16" in self.cpu_flags else "avx512_bf16"
        return "avx2" if "avx2" in self.cpu_flags else self.machine

    def to_dict(self) -> dict:
        return {
            **asdict(self),
            "cpu_flags": list(self.cpu_flags),
            "cpu_class": self.cpu_class,
            "cpu_bf16_native": self.cpu_bf16_native,
        }

    def describe(self) -> str:
        cuda = f"; CUDA {self.cuda} (bf16 {'yes' if self.cuda_bf16 else 'no'})" if self.cuda else "; no CUDA"
        caps = f", ONEDNN_MAX_CPU_ISA={self.onednn_max_isa}" if self.onednn_max_isa else ""
        return (
            f"CPU {self.machine} class {self.cpu_class} (flags {' '.join(self.cpu_flags) or 'none of ' + '/'.join(CPU_FLAGS)}, "
            f"ATen {self.aten_capability}{caps}, bf16 {'native' if self.cpu_bf16_native else 'emulated'}, {self.threads} threads){cuda}"
        )


def read_cpu_flags(path: str = "/proc/cpuinfo") -> tuple[str, ...]:
    """CPU_FLAGS present in the first ``flags`` line of /proc/cpuinfo (empty elsewhere)."""
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    present = set(line.split(":", 1)[1].split())
                    return tuple(f for f in CPU_FLAGS if f in present)
    except OSError:
        pass
    return ()


@functools.cache
def detect() -> Hardware:
    """This process's hardware, looked up once."""
    cuda = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    onednn_bf16 = bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return Hardware(
        machine=platform.machine(),
        cpu_flags=read_cpu_flags(),
        aten_capability=torch.backends.cpu.get_cpu_capability(),
        onednn_max_isa=os.environ.get("ONEDNN_MAX_CPU_ISA", os.environ.get("DNNL_MAX_CPU_ISA")) or None,
        onednn_bf16=onednn_bf16,
        threads=torch.get_num_threads(),
        cuda=cuda,
        cuda_bf16=bool(cuda and torch.cuda.is_bf16_supported()),
    )


def resolve_precision(precision: str, device: torch.device, key: str, hw: Hardware | None = None) -> str:
    """``auto`` becomes bf16 where the device runs it natively, else fp32 (never fp16). An
    explicit bf16 on a CPU that emulates it runs, with one warning that says what it costs."""
    setting(precision, key)
    hw = hw or detect()
    native = hw.cuda_bf16 if device.type == "cuda" else hw.cpu_bf16_native
    if precision == "auto":
        return "bf16" if native else "fp32"
    if precision == "bf16" and device.type == "cpu" and not native:
        warn_emulated_bf16(key, hw.cpu_class)
    return precision


@functools.cache
def warn_emulated_bf16(key: str, cpu_class: str) -> None:
    """Once per key and process: bf16 asked for on a CPU without native bf16."""
    log.warning(
        "%s=bf16 on a CPU without native bf16 (class %s): emulated, %.1fx slower than fp32 in a matmul measured now; "
        "use %s=auto or fp32",
        key,
        cpu_class,
        bf16_slowdown(),
        key,
    )


def bf16_slowdown(size: int = 512, repeats: int = 10) -> float:
    """Time of a bf16 matmul over an fp32 one of the same shape on this CPU (>1: bf16 slower)."""

    def best(dtype: torch.dtype) -> float:
        a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
        return best_seconds(lambda: a @ b, repeats)

    return best(torch.bfloat16) / max(best(torch.float32), 1e-9)


def best_seconds(run: Callable[[], object], repeats: int = 3) -> float:
    """The fastest of ``repeats`` timed calls of ``run``, after one untimed call (the first
    call builds kernels and pages)."""
    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)


# what makes this machine behave like a lower class (benchmarks: --isa)
ISA_CAPS = {"avx2": {"ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}}


def emulate_isa(isa: str | None) -> None:
    """Restart this script under the caps of a lower CPU class (oneDNN, MKL and ATen read
    them when they load, so setting them now would be too late); returns once they hold."""
    if not isa or isa == "native":
        return
    if isa not in ISA_CAPS:
        raise UserError(f"--isa {isa!r}: expected native or {', '.join(ISA_CAPS)}")
    caps = ISA_CAPS[isa]
    if all(os.environ.get(k) == v for k, v in caps.items()):
        return
    import sys

    os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **caps})


def class_line() -> str:
    """One line for a benchmark's table header: the class, and a bf16 timing showing whether
    bf16 is native here (or the emulation took)."""
    return f"{detect().describe()}; bf16 matmul {bf16_slowdown():.2f}x the time of fp32"
