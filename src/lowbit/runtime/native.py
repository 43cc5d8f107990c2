"""lowbit's own CPU helper kernels: C source shipped in the package (``csrc/lowbit_cpu.c``),
compiled at first use with the machine's C compiler (``$CC`` or ``cc``; ``-O3
-march=native``, so the build fits this CPU) into ``<cache>/native/`` (see
:func:`lowbit._fs.cache_dir`) and called through :mod:`ctypes`, which releases the GIL.

Nothing here is needed for correctness: every caller has a torch path, and takes it (with a
:func:`lowbit.hardware.fell_back` record and one warning) where there is no compiler, the
build fails, the probe below disagrees with torch, or ``LOWBIT_NATIVE=0`` is set.

Kernels:

* :func:`dequant_int4pack_t`: torch's CPU int4 packed weight
  (``torch._convert_weight_to_int4pack_for_cpu``) and its ``[G, N, 2]`` bfloat16
  (scale, zero) table, dequantized to the transposed bfloat16 weight ``W^T [K, N]`` for a
  GEMM (int4 weight-only prefill, :mod:`lowbit.runtime.kernels`). The packed layout is not
  documented by torch and depends on its build (blocks of 64 output channels on AVX-512): it
  is found by packing a probe matrix with torch's own function, and the dequantization is
  checked against torch's int4 matmul on that probe before it is used.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

from lowbit._fs import cache_dir
from lowbit.errors import ConfigError

SOURCE = Path(__file__).with_name("csrc") / "lowbit_cpu.c"
FLAGS = ("-O3", "-march=native", "-shared", "-fPIC", "-pthread", "-std=gnu99")
_LOCK = threading.Lock()
_STATE: dict = {}


class NativeUnavailable(RuntimeError):
    """The native kernels cannot be used here (the message says why)."""


def _cpu_key() -> str:
    """What ``-march=native`` depends on: the CPU model and flags (Linux), else the arch."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = [ln for ln in f if ln.startswith(("model name", "flags"))][:2]
        return "".join(lines)
    except OSError:
        return platform.processor() or platform.machine()


def _build() -> Path:
    cc = os.environ.get("CC") or "cc"
    exe = shutil.which(cc)
    if exe is None:
        raise NativeUnavailable(f"no C compiler ({cc!r} not on PATH; set $CC)")
    try:
        ver = subprocess.run([exe, "--version"], capture_output=True, text=True,
                             timeout=30).stdout.splitlines()[:1]
    except (OSError, subprocess.SubprocessError) as e:
        raise NativeUnavailable(f"{cc} --version failed: {e}") from None
    src = SOURCE.read_bytes()
    key = hashlib.sha256(src + repr((ver, FLAGS, _cpu_key())).encode()).hexdigest()[:20]
    out_dir = cache_dir() / "native"
    lib = out_dir / f"lowbit_cpu-{key}.so"
    if lib.exists():
        return lib
    out_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out_dir)
    os.close(fd)
    try:
        r = subprocess.run([exe, *FLAGS, "-o", tmp, str(SOURCE)], capture_output=True,
                           text=True, timeout=300)
        if r.returncode != 0:
            err = (r.stderr or r.stdout).strip().splitlines()
            raise NativeUnavailable(f"{cc} failed on {SOURCE.name}: "
                                    f"{err[0] if err else 'exit ' + str(r.returncode)}")
        os.replace(tmp, lib)  # whole or not at all: a concurrent build writes the same bytes
    except subprocess.TimeoutExpired:
        raise NativeUnavailable(f"{cc} took over 300 s on {SOURCE.name}") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return lib


def _load() -> ctypes.CDLL:
    if os.environ.get("LOWBIT_NATIVE", "1") == "0":
        raise NativeUnavailable("switched off by LOWBIT_NATIVE=0")
    lib = ctypes.CDLL(str(_build()))
    f = lib.lb_int4pack_dequant_t
    f.restype = ctypes.c_int
    f.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 5
    return lib


def library() -> ctypes.CDLL:
    """The compiled helper library (built and loaded once per process); raises
    :class:`NativeUnavailable` with the reason when it cannot be had."""
    with _LOCK:
        if "lib" not in _STATE:
            try:
                _STATE["lib"] = _load()
            except NativeUnavailable as e:
                _STATE["lib"] = e
            except OSError as e:  # dlopen of the built file
                _STATE["lib"] = NativeUnavailable(f"loading the built library failed: {e}")
        got = _STATE["lib"]
    if isinstance(got, Exception):
        raise got
    return got


def reset() -> None:
    """Forget the loaded library and probes (tests switch ``LOWBIT_NATIVE`` and call this)."""
    with _LOCK:
        _STATE.clear()


# --- int4 packed weights -------------------------------------------------------------------
PROBE_N, PROBE_K, PROBE_GROUP = 128, 64, 32


def _int4pack_block() -> int:
    """Output channels per block of torch's CPU int4 packed layout (64 on AVX-512), found by
    packing a probe; NativeUnavailable if the layout is none this module knows."""
    n, k = PROBE_N, PROBE_K
    q = torch.arange(n * k, dtype=torch.int32).reshape(n, k) % 16
    p = torch._convert_weight_to_int4pack_for_cpu(q, 1)
    if p.dtype != torch.uint8 or p.numel() != n * k // 2:
        raise NativeUnavailable(f"torch's int4 packed weight is {p.dtype} {list(p.shape)}, "
                                f"not {n * k // 2} bytes")
    for bn in (64, 32, 16, 128):
        v = p.reshape(n // bn, k, bn // 2)
        u = torch.cat([v & 15, v >> 4], -1).permute(0, 2, 1).reshape(n, k).to(torch.int32)
        if torch.equal(u, q):
            return bn
    raise NativeUnavailable("torch's CPU int4 packed layout is not blocks of 16/32/64/128 "
                            "output channels x K (an unknown torch build)")


def int4pack_ready() -> int:
    """The packed block size (64 on AVX-512 builds of torch) once the library is built and
    its dequantization agrees with ``torch._weight_int4pack_mm_for_cpu`` on a probe;
    raises :class:`NativeUnavailable` (cached) otherwise."""
    with _LOCK:
        got = _STATE.get("int4")
    if got is None:
        try:
            library()
            bn = _int4pack_block()
            _check_int4(bn)
            got = bn
        except NativeUnavailable as e:
            got = e
        except RuntimeError as e:  # a torch op of the probe
            got = NativeUnavailable(f"the int4 probe failed: {e}")
        with _LOCK:
            _STATE["int4"] = got
    if isinstance(got, Exception):
        raise got
    return got


def _check_int4(bn: int) -> None:
    n, k, g = PROBE_N, PROBE_K, PROBE_GROUP
    gen = torch.Generator().manual_seed(0)
    q = torch.randint(0, 16, (n, k), generator=gen, dtype=torch.int32)
    p = torch._convert_weight_to_int4pack_for_cpu(q, 1)
    sz = torch.stack([torch.rand(k // g, n, generator=gen) * 0.1 + 0.01,
                      torch.randn(k // g, n, generator=gen) * 0.05], -1).to(torch.bfloat16)
    x = torch.eye(k, dtype=torch.bfloat16)  # torch's matmul against the identity: W^T itself
    want = torch._weight_int4pack_mm_for_cpu(x, p, g, sz.contiguous()).float()
    got = _dequant(p, sz.contiguous(), n, k, g, bn).float()
    err = float((got - want).abs().max())
    tol = float(want.abs().max()) * 2 ** -7
    if not err <= tol:
        raise NativeUnavailable(f"the native int4 dequantization differs from torch's int4 "
                                f"matmul by {err:.3g} (tolerance {tol:.3g})")


def _dequant(packed, sz, n: int, k: int, group: int, bn: int, threads: int = 1):
    out = torch.empty(k, n, dtype=torch.bfloat16)
    r = library().lb_int4pack_dequant_t(packed.data_ptr(), sz.data_ptr(), out.data_ptr(),
                                         n, k, bn, group, threads)
    if r != 0:
        raise ConfigError(f"lb_int4pack_dequant_t refused n={n} k={k} block={bn} "
                          f"group={group}")
    return out


#: elements per extra thread of the dequantization (smaller matrices stay on one thread:
#: starting a thread costs more than it saves)
THREAD_ELEMS = 1 << 22


def dequant_int4pack_t(packed: torch.Tensor, scale_zeros: torch.Tensor, n: int, k: int,
                       group: int) -> torch.Tensor:
    """``W^T [k, n]`` bfloat16 from torch's CPU int4 packed weight ``packed`` (of an
    ``[n, k]`` weight) and ``scale_zeros [k / group, n, 2]`` bfloat16 (scale, zero):
    ``W[n, k] = (q_u - 8) * scale + zero`` as ``torch._weight_int4pack_mm_for_cpu``
    computes it, rounded once to bfloat16. Raises :class:`NativeUnavailable` when the native
    path is not usable here (see :func:`int4pack_ready`)."""
    bn = int4pack_ready()
    if packed.dtype != torch.uint8 or packed.numel() * 2 != n * k or not packed.is_contiguous():
        raise ConfigError(f"packed int4 weight: expected {n * k // 2} contiguous uint8 bytes; "
                          f"got {packed.dtype} {list(packed.shape)}")
    if scale_zeros.dtype != torch.bfloat16 or tuple(scale_zeros.shape) != (k // group, n, 2) \
            or not scale_zeros.is_contiguous() or k % group or n % bn:
        raise ConfigError(f"scale_zeros: expected contiguous bfloat16 [{k // group}, {n}, 2] "
                          f"(n a multiple of {bn}, k of the group {group}); got "
                          f"{scale_zeros.dtype} {list(scale_zeros.shape)}")
    threads = max(1, min(torch.get_num_threads(), (n * k) // THREAD_ELEMS + 1))
    return _dequant(packed, scale_zeros, n, k, group, bn, threads)
