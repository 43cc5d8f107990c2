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

Torch operators (C++ source ``csrc/lowbit_ops.cpp``, built with ``$CXX`` or ``c++`` against
the installed torch's headers and loaded with ``torch.ops.load_library``, once per process;
a decode step captured by ``torch.compile`` calls them through torch's dispatcher):

* ``torch.ops.lowbit.int4_mm`` (:func:`int4_gemv_ready`): the int4 GEMV of a decode row on
  torch's packed weight, the same operands and function as
  ``torch._weight_int4pack_mm_for_cpu``, with bfloat16 dot-product instructions (AVX-512
  BF16 and VBMI: Zen 4, Sapphire Rapids and later); checked against torch's kernel on a
  probe before it is used;
* ``torch.ops.lowbit.bf16_mm`` (:func:`bf16_gemv_ready`): a decode row through a bfloat16
  weight, as ``torch.mv`` computes it (float32 accumulation), with the same instructions;
* ``torch.ops.lowbit.int8_mm`` (:func:`int8_gemv_ready`): a decode row through per-channel
  int8 weights, as ``torch._weight_int8pack_mm`` computes it;
* ``torch.ops.lowbit.decode_attn`` (:func:`decode_attn_ready`): the attention of one query
  over the filled part of a static KV cache, in float32, for :class:`FastDecoder`'s step.
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
_RESET_HOOKS: list = []  # callables run by reset() (callers that cache a decision)


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


def _compile(env: str, default: str, what: str, source: Path, stem: str, args: tuple,
             key_extra: tuple, timeout: int) -> Path:
    """``<cache>/native/<stem>-<key>.so`` built from ``source`` by the compiler ``$env`` (or
    ``default``) with ``args``, keyed by the source, compiler version, args, ``key_extra``
    and the CPU; built into a temporary file and renamed (whole or not at all)."""
    cc = os.environ.get(env) or default
    exe = shutil.which(cc)
    if exe is None:
        raise NativeUnavailable(f"no {what} compiler ({cc!r} not on PATH; set ${env})")
    try:
        ver = subprocess.run([exe, "--version"], capture_output=True, text=True,
                             timeout=30).stdout.splitlines()[:1]
    except (OSError, subprocess.SubprocessError) as e:
        raise NativeUnavailable(f"{cc} --version failed: {e}") from None
    key = hashlib.sha256(source.read_bytes() + repr(
        (ver, args, key_extra, _cpu_key())).encode()).hexdigest()[:20]
    out_dir = cache_dir() / "native"
    lib = out_dir / f"{stem}-{key}.so"
    if lib.exists():
        return lib
    out_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out_dir)
    os.close(fd)
    try:
        r = subprocess.run([exe, str(source), "-o", tmp, *args], capture_output=True,
                           text=True, timeout=timeout)
        if r.returncode != 0:
            out = (r.stderr or r.stdout).strip().splitlines()
            err = [ln for ln in out if "error" in ln] or out
            raise NativeUnavailable(f"{cc} failed on {source.name}: "
                                    f"{err[0] if err else 'exit ' + str(r.returncode)}")
        os.replace(tmp, lib)  # a concurrent build writes the same bytes
    except subprocess.TimeoutExpired:
        raise NativeUnavailable(f"{cc} took over {timeout} s on {source.name}") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return lib


def _build() -> Path:
    return _compile("CC", "cc", "C", SOURCE, "lowbit_cpu", FLAGS, (), 300)


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
    """Forget the loaded library and probes (tests switch ``LOWBIT_NATIVE`` and call this).
    The torch operators stay registered (torch cannot unload them); the next
    :func:`int4_gemv_ready` / :func:`bf16_gemv_ready` probes them again, and the decode
    path's once-per-process choice (:func:`lowbit.runtime.fuse.bf16_gemv`) is made again."""
    with _LOCK:
        _STATE.clear()
        for hook in _RESET_HOOKS:
            hook()


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


# --- torch operators (C++) -----------------------------------------------------------------
OPS_SOURCE = Path(__file__).with_name("csrc") / "lowbit_ops.cpp"
OPS_FLAGS = ("-O3", "-march=native", "-shared", "-fPIC", "-std=c++17", "-w")
_OPS: dict = {}  # {"path": the library loaded into this process} (never unloaded)


def _build_ops() -> Path:
    tdir = Path(torch.__file__).parent
    inc = [tdir / "include", tdir / "include" / "torch" / "csrc" / "api" / "include"]
    if not (inc[0] / "torch" / "library.h").exists():
        raise NativeUnavailable(f"torch's C++ headers are not installed ({inc[0]})")
    abi = int(getattr(torch._C, "_GLIBCXX_USE_CXX11_ABI", 1))
    args = (*OPS_FLAGS, f"-D_GLIBCXX_USE_CXX11_ABI={abi}", *(f"-I{d}" for d in inc),
            f"-L{tdir / 'lib'}", "-lc10", "-ltorch_cpu", f"-Wl,-rpath,{tdir / 'lib'}")
    return _compile("CXX", "c++", "C++", OPS_SOURCE, "lowbit_ops", args, (torch.__version__,),
                    600)


def _load_ops() -> None:
    """Build and load the operator library into this process (once), with the shape
    functions ``torch.compile`` traces with."""
    if os.environ.get("LOWBIT_NATIVE", "1") == "0":
        raise NativeUnavailable("switched off by LOWBIT_NATIVE=0")
    if "path" in _OPS:
        return
    if hasattr(torch.ops, "lowbit") and hasattr(torch.ops.lowbit, "int4_mm"):
        raise NativeUnavailable("another library registered torch.ops.lowbit.int4_mm")
    lib = _build_ops()
    try:
        torch.ops.load_library(str(lib))
    except (OSError, RuntimeError) as e:
        raise NativeUnavailable(f"loading {lib.name} failed: {str(e).splitlines()[0]}") from None

    @torch.library.register_fake("lowbit::int4_mm")
    def _int4_mm_fake(x, packed, scale_zeros, group):
        return x.new_empty(x.shape[0], scale_zeros.shape[1])

    @torch.library.register_fake("lowbit::bf16_mm")
    def _bf16_mm_fake(x, w):
        return x.new_empty(x.shape[0], w.shape[0])

    @torch.library.register_fake("lowbit::int8_mm")
    def _int8_mm_fake(x, w, scale):
        return x.new_empty(x.shape[0], w.shape[0])

    @torch.library.register_fake("lowbit::decode_attn")
    def _decode_attn_fake(q, k, v, pos, scale):
        return torch.empty_like(q)

    _OPS["path"] = lib


def choose(path: str, ready, fallback: str) -> bool:
    """Whether a native path can be taken: ``ready()`` (one of the ``*_ready`` functions)
    passes -> recorded as taken under ``path`` in
    :func:`lowbit.hardware.hardware_path_report`; switched off by ``LOWBIT_NATIVE=0`` ->
    recorded as not attempted; any other reason -> one warning, ``fallback`` says what runs
    instead."""
    from lowbit.hardware import fell_back, not_attempted, took_hardware
    try:
        ready()
    except NativeUnavailable as e:
        if "LOWBIT_NATIVE=0" in str(e):
            not_attempted(path, str(e))
        else:
            fell_back(path, e, fallback)
        return False
    took_hardware(path)
    return True


def _op_ready(key: str, what: str, check) -> None:
    """Build/load the operator library and run ``check()`` once per process (cached under
    ``key``); raise :class:`NativeUnavailable` with the reason when either fails."""
    with _LOCK:
        got = _STATE.get(key)
    if got is None:
        try:
            with _LOCK:
                _load_ops()
            check()
            got = True
        except NativeUnavailable as e:
            got = e
        except RuntimeError as e:  # the op itself (e.g. built without AVX-512 BF16)
            got = NativeUnavailable(f"the {what} probe failed: {str(e).splitlines()[0]}")
        with _LOCK:
            _STATE[key] = got
    if isinstance(got, Exception):
        raise got


def int4_gemv_ready() -> None:
    """Return once ``torch.ops.lowbit.int4_mm`` is built, loaded and agrees with
    ``torch._weight_int4pack_mm_for_cpu`` on a probe (decode rows of several shapes and
    group sizes, to 2^-7 of the largest output: one bfloat16 rounding apart); raises
    :class:`NativeUnavailable` (cached) with the reason otherwise."""
    _op_ready("int4_gemv", "int4 GEMV", _check_int4_gemv)


def _check_int4_gemv() -> None:
    if _int4pack_block() != 64:
        raise NativeUnavailable("torch's int4 packed layout is not blocks of 64 output "
                                "channels (the layout the GEMV reads)")
    gen = torch.Generator().manual_seed(0)
    for n, k, g in ((128, 64, 32), (192, 256, 64), (64, 512, 128), (128, 512, 256)):
        q = torch.randint(0, 16, (n, k), generator=gen, dtype=torch.int32)
        p = torch._convert_weight_to_int4pack_for_cpu(q, 1)
        sz = torch.stack([torch.rand(k // g, n, generator=gen) * 0.1 + 0.01,
                          torch.randn(k // g, n, generator=gen) * 0.05], -1).to(torch.bfloat16)
        sz = sz.contiguous()
        x = torch.randn(1, k, generator=gen).to(torch.bfloat16)
        want = torch._weight_int4pack_mm_for_cpu(x, p, g, sz).float()
        got = torch.ops.lowbit.int4_mm(x, p, sz, g).float()
        err = float((got - want).abs().max())
        tol = float(want.abs().max()) * 2 ** -7
        if not err <= tol:
            raise NativeUnavailable(f"the native int4 GEMV differs from torch's int4 matmul by "
                                    f"{err:.3g} (tolerance {tol:.3g}) at n={n} k={k} group={g}")


def bf16_gemv_ready() -> None:
    """Return once ``torch.ops.lowbit.bf16_mm`` is built, loaded and agrees with ``torch.mv``
    on a probe (several shapes, odd widths included, to 2^-7 of the largest output); raises
    :class:`NativeUnavailable` (cached) with the reason otherwise."""
    _op_ready("bf16_gemv", "bfloat16 GEMV", _check_bf16_gemv)


def _check_bf16_gemv() -> None:
    gen = torch.Generator().manual_seed(0)
    for n, k in ((64, 576), (37, 70), (200, 1536)):
        w = torch.randn(n, k, generator=gen).to(torch.bfloat16)
        x = torch.randn(1, k, generator=gen).to(torch.bfloat16)
        want = torch.mv(w, x[0]).float()
        err = float((torch.ops.lowbit.bf16_mm(x, w)[0].float() - want).abs().max())
        tol = float(want.abs().max()) * 2 ** -7
        if not err <= tol:
            raise NativeUnavailable(f"the native bfloat16 GEMV differs from torch.mv by "
                                    f"{err:.3g} (tolerance {tol:.3g}) at {n}x{k}")


def int8_gemv_ready() -> None:
    """Return once ``torch.ops.lowbit.int8_mm`` is built, loaded and agrees with
    ``torch._weight_int8pack_mm`` on a probe (several shapes, odd widths included, to 2^-7 of
    the largest output); raises :class:`NativeUnavailable` (cached) with the reason
    otherwise."""
    _op_ready("int8_gemv", "int8 GEMV", _check_int8_gemv)


def _check_int8_gemv() -> None:
    gen = torch.Generator().manual_seed(0)
    for n, k in ((64, 576), (40, 80), (200, 1536)):
        w = torch.randint(-128, 128, (n, k), generator=gen, dtype=torch.int8)
        s = (torch.rand(n, generator=gen) * 0.01 + 1e-3).to(torch.bfloat16)
        x = torch.randn(1, k, generator=gen).to(torch.bfloat16)
        want = (x.float() @ w.float().t() * s.float()).float()
        err = float((torch.ops.lowbit.int8_mm(x, w, s).float() - want).abs().max())
        tol = float(want.abs().max()) * 2 ** -7
        if not err <= tol:
            raise NativeUnavailable(f"the native int8 GEMV differs from float32 by "
                                    f"{err:.3g} (tolerance {tol:.3g}) at {n}x{k}")


def decode_attn_ready() -> None:
    """Return once ``torch.ops.lowbit.decode_attn`` is built, loaded and agrees with the
    float32 attention of one query (softmax of scaled scores over the filled cache, grouped
    heads) on a probe, to 2^-7 of the largest output in bfloat16 and 1e-5 in float32;
    raises :class:`NativeUnavailable` (cached) with the reason otherwise."""
    _op_ready("decode_attn", "decode attention", _check_decode_attn)


def _check_decode_attn() -> None:
    gen = torch.Generator().manual_seed(0)
    for dt, tol in ((torch.bfloat16, 2 ** -7), (torch.float32, 1e-5)):
        for h, nkv, cache, d, pos in ((9, 3, 64, 64, 40), (4, 4, 16, 128, 0), (8, 2, 32, 32, 31)):
            q = torch.randn(h, d, generator=gen).to(dt)
            k, v = (torch.randn(nkv, cache, d, generator=gen).to(dt) for _ in range(2))
            kk, vv = (t[:, :pos + 1].float().repeat_interleave(h // nkv, 0) for t in (k, v))
            att = torch.softmax(torch.einsum("hd,hld->hl", q.float(), kk) * d ** -0.5, -1)
            want = torch.einsum("hl,hld->hd", att, vv)
            got = torch.ops.lowbit.decode_attn(q, k, v, torch.tensor([pos]), d ** -0.5).float()
            err = float((got - want).abs().max())
            if not err <= tol * float(want.abs().max()):
                raise NativeUnavailable(f"the native decode attention differs from float32 "
                                        f"attention by {err:.3g} ({dt}, {h} heads, position "
                                        f"{pos})")
