"""A native product for the few rows of a decoding step, built once on first use.

``y (R, O) = x (R, I) @ W (O, I)^T + b`` for ``R <= MAX_ROWS`` float32 rows: each thread walks its share
of ``W``'s rows two at a time, reads them once, and multiplies them into every row of ``x`` (which
sits in L1), so the product costs one pass over the weight: what a decoding step is bound by. MKL's
kernels for these shapes read the weight at a third to a half of the machine's bandwidth (see
:mod:`specdec.backends.cpu_linear`).

Measured here (SmolLM2-135M, float32, 2 threads, 200 cached tokens; ``python -m experiments.bench_forward
--linear-free``, one run, median ms of one forward; read bandwidth 36.5 GB/s at the time):

======  =======  ==========================  ================  ===========
tokens  F.linear  torch products (``skinny``)  this (``auto``)  linear free
======  =======  ==========================  ================  ===========
1       56.5     32.2                        29.3              8.3
2       92.0     32.9                        31.1              9.6
4       80.6     39.1                        35.8              9.9
8       79.7     48.3                        36.8              10.8
16      94.1     59.0                        59.6 (two passes) 12.7
======  =======  ==========================  ================  ===========

So the 1-token step's products read the weights at about 26 GB/s (21 ms for 538 MB), 70% of the measured
bandwidth; prefetching each thread's next 8 KB into L2 (``_MM_HINT_T1``) is what raised it from about
20 GB/s (prefetching into L1 gained little).

The source below is compiled with the system's C++ compiler (``$CXX``, else ``g++``/``c++``) the first
time a process asks for it, with ``-O3 -march=native -fopenmp`` (AVX-512 intrinsics where the CPU has
them, GCC vector extensions elsewhere), into a cache directory (``$SPECDEC_CACHE``, else
``$XDG_CACHE_HOME/specdec``, else ``~/.cache/specdec``) under a name that hashes the source, the
flags, the compiler and the CPU; later processes load the built file. It is called through
``ctypes``, which releases the GIL, and runs its threads on torch's own OpenMP runtime (the library
links ``libgomp.so.1``, the name of the runtime torch already loaded), ``torch.get_num_threads()`` of
them.

Numerics: each output is the same float32 dot product as ``F.linear``'s, summed in another order
(16 lanes, then the lanes), so it agrees with ``F.linear`` to float rounding, as any other kernel or
batch shape does; the engine's greedy equality with ``model.generate`` is tested under it.

The same library holds the step's RMSNorm and rotary embedding (``specdec_rms_norm``, ``specdec_rope``;
:meth:`RowsLinear.rms_norm`, :meth:`RowsLinear.rope`, used by :mod:`specdec.backends.fused`). They are built
with ``-ffp-contract=off`` so that no multiply and add are fused into one rounding where transformers
rounds twice: the rotary embedding equals transformers' to the bit, the norm differs only in the order its
sum of squares is added.

Where it cannot be built (no compiler, a failed build, ``SPECDEC_NATIVE=0``), :func:`load` returns
``None`` and warns once per process; the engine then takes the pure-torch products and the model's own
norms and rotary embeddings.
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
import warnings
from pathlib import Path

import torch
from torch import Tensor

MAX_ROWS = 8  # rows per pass over the weight (more rows: the caller splits, or takes another product)

SOURCE = r"""
#include <stdint.h>
#include <string.h>
#include <math.h>
#include <omp.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

// rows j0..j1 of y (R, O) = x (R, I) @ w (O, I)^T (+ b): two rows of w at a time, each read once
template <int R>
static void block(const float* __restrict x, const float* __restrict w, const float* __restrict b,
                  float* __restrict y, int64_t O, int64_t I, int64_t j0, int64_t j1) {
  const int64_t full = I & ~int64_t(15);
  for (int64_t j = j0; j < j1; j += 2) {
    const bool two = j + 1 < j1;
    const float* w0 = w + j * I;
    const float* w1 = two ? w0 + I : w0;
    float s0[R], s1[R];
#if defined(__AVX512F__)
    __m512 a0[R], a1[R];
    for (int r = 0; r < R; ++r) { a0[r] = _mm512_setzero_ps(); a1[r] = _mm512_setzero_ps(); }
    for (int64_t k = 0; k < full; k += 16) {
      _mm_prefetch((const char*)(w0 + k + 2048), _MM_HINT_T1);  // 8 KB ahead, into L2: more reads in flight
      _mm_prefetch((const char*)(w1 + k + 2048), _MM_HINT_T1);
      const __m512 v0 = _mm512_loadu_ps(w0 + k), v1 = _mm512_loadu_ps(w1 + k);
      for (int r = 0; r < R; ++r) {
        const __m512 xr = _mm512_loadu_ps(x + r * I + k);
        a0[r] = _mm512_fmadd_ps(v0, xr, a0[r]);
        a1[r] = _mm512_fmadd_ps(v1, xr, a1[r]);
      }
    }
    for (int r = 0; r < R; ++r) { s0[r] = _mm512_reduce_add_ps(a0[r]); s1[r] = _mm512_reduce_add_ps(a1[r]); }
#else
    typedef float v16 __attribute__((vector_size(64)));
    v16 a0[R], a1[R];
    for (int r = 0; r < R; ++r) { a0[r] = (v16){}; a1[r] = (v16){}; }
    for (int64_t k = 0; k < full; k += 16) {
      v16 v0, v1;
      memcpy(&v0, w0 + k, sizeof v0);
      memcpy(&v1, w1 + k, sizeof v1);
      for (int r = 0; r < R; ++r) {
        v16 xr;
        memcpy(&xr, x + r * I + k, sizeof xr);
        a0[r] += v0 * xr;
        a1[r] += v1 * xr;
      }
    }
    for (int r = 0; r < R; ++r) {
      s0[r] = 0.f; s1[r] = 0.f;
      for (int i = 0; i < 16; ++i) { s0[r] += a0[r][i]; s1[r] += a1[r][i]; }
    }
#endif
    for (int r = 0; r < R; ++r) {
      for (int64_t k = full; k < I; ++k) { s0[r] += w0[k] * x[r * I + k]; s1[r] += w1[k] * x[r * I + k]; }
      y[r * O + j] = s0[r] + (b ? b[j] : 0.f);
      if (two) y[r * O + j + 1] = s1[r] + (b ? b[j + 1] : 0.f);
    }
  }
}

typedef void (*block_fn)(const float*, const float*, const float*, float*, int64_t, int64_t, int64_t, int64_t);
static const block_fn BLOCKS[9] = {0, block<1>, block<2>, block<3>, block<4>, block<5>, block<6>, block<7>, block<8>};

// 0 on success; 1 when R is out of range
extern "C" int specdec_rows_linear(const float* x, const float* w, const float* b, float* y, int64_t R, int64_t O,
                                   int64_t I, int threads) {
  if (R < 1 || R > 8) return 1;
  const block_fn f = BLOCKS[R];
  const int64_t pairs = (O + 1) / 2;
  if (threads <= 1 || O < 64) { f(x, w, b, y, O, I, 0, O); return 0; }
#pragma omp parallel num_threads(threads)
  {
    const int64_t t = omp_get_thread_num(), n = omp_get_num_threads();
    const int64_t j0 = 2 * (pairs * t / n), j1 = 2 * (pairs * (t + 1) / n);
    f(x, w, b, y, O, I, j0, j1 < O ? j1 : O);
  }
  return 0;
}

// RMSNorm of R rows of N: y = w * (x * (1 / sqrt(sum(x * x) / N + eps))), the operations of transformers'
// LlamaRMSNorm in float32, each rounded as there (built with -ffp-contract=off: no fused multiply-add); only
// the sum of squares is added in another order (16 lanes, then the lanes)
extern "C" void specdec_rms_norm(const float* x, const float* w, float* y, int64_t R, int64_t N, float eps) {
  const int64_t full = N & ~int64_t(15);
  for (int64_t r = 0; r < R; ++r) {
    const float* xr = x + r * N;
    float* yr = y + r * N;
    float ss = 0.f;
#if defined(__AVX512F__)
    __m512 acc = _mm512_setzero_ps();
    for (int64_t k = 0; k < full; k += 16) {
      const __m512 v = _mm512_loadu_ps(xr + k);
      acc = _mm512_add_ps(acc, _mm512_mul_ps(v, v));
    }
    ss = _mm512_reduce_add_ps(acc);
#else
    float lanes[16] = {0.f};
    for (int64_t k = 0; k < full; k += 16)
      for (int i = 0; i < 16; ++i) lanes[i] += xr[k + i] * xr[k + i];
    for (int i = 0; i < 16; ++i) ss += lanes[i];
#endif
    for (int64_t k = full; k < N; ++k) ss += xr[k] * xr[k];
    const float inv = 1.f / sqrtf(ss / (float)N + eps);
    for (int64_t k = 0; k < N; ++k) yr[k] = w[k] * (xr[k] * inv);
  }
}

// rotary embedding of one tensor (B, H, T, D), any strides but the last (1): out = x * cos + rotate_half(x) * sin,
// rotate_half(x) = cat(-x[D/2:], x[:D/2]), with cos and sin (B or 1, T, D); the operations of transformers'
// apply_rotary_pos_emb, each rounded as there, so the result is the same to the bit
static void rotate(const float* x, float* y, const float* c, const float* s, int64_t B, int64_t H, int64_t T,
                   int64_t D, const int64_t* xs, const int64_t* ys, int64_t cb) {
  const int64_t half = D / 2;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h)
      for (int64_t t = 0; t < T; ++t) {
        const float* xr = x + b * xs[0] + h * xs[1] + t * xs[2];
        float* yr = y + b * ys[0] + h * ys[1] + t * ys[2];
        const float* cr = c + b * cb + t * D;
        const float* sr = s + b * cb + t * D;
        for (int64_t i = 0; i < half; ++i) yr[i] = xr[i] * cr[i] + (-xr[i + half]) * sr[i];
        for (int64_t i = half; i < D; ++i) yr[i] = xr[i] * cr[i] + xr[i - half] * sr[i];
      }
}

// q and k (B, Hq or Hk, T, D) into qo and ko; strides in elements, [batch, head, token] each (last stride 1)
extern "C" void specdec_rope(const float* q, const float* k, const float* c, const float* s, float* qo, float* ko,
                             int64_t B, int64_t Hq, int64_t Hk, int64_t T, int64_t D, const int64_t* strides,
                             int64_t cos_batch_stride) {
  rotate(q, qo, c, s, B, Hq, T, D, strides, strides + 3, cos_batch_stride);
  rotate(k, ko, c, s, B, Hk, T, D, strides + 6, strides + 9, cos_batch_stride);
}
"""

FLAGS = ("-O3", "-march=native", "-ffp-contract=off", "-fopenmp", "-shared", "-fPIC", "-std=c++17")


class RowsLinear:
    """The built library: :meth:`__call__` is ``F.linear`` for up to :data:`MAX_ROWS` float32 CPU rows;
    :meth:`rms_norm` and :meth:`rope` are the step's RMSNorm and rotary embedding (:mod:`specdec.backends.fused`)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        library = ctypes.CDLL(str(path))
        self._fn = library.specdec_rows_linear
        self._fn.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 3 + [ctypes.c_int]
        self._fn.restype = ctypes.c_int
        self._norm = library.specdec_rms_norm
        self._norm.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 2 + [ctypes.c_float]
        self._norm.restype = None
        self._rope = library.specdec_rope
        self._rope.argtypes = [ctypes.c_void_p] * 6 + [ctypes.c_int64] * 5 + [ctypes.c_void_p, ctypes.c_int64]
        self._rope.restype = None

    def rms_norm(self, x: Tensor, weight: Tensor, eps: float) -> Tensor:
        """``weight * (x * rsqrt(mean(x ** 2, -1) + eps))`` for contiguous float32 CPU ``x (..., N)`` and
        ``weight (N,)``: LlamaRMSNorm's operations, its sum of squares added in another order."""
        out = torch.empty_like(x)
        width = x.shape[-1]
        self._norm(x.data_ptr(), weight.data_ptr(), out.data_ptr(), x.numel() // width, width, eps)
        return out

    def rope(self, q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
        """``q (B, H, T, D)``, ``k (B, Hk, T, D)`` rotated by ``cos``, ``sin`` ``(B or 1, T, D)`` (contiguous), as
        transformers' ``apply_rotary_pos_emb`` with ``unsqueeze_dim=1``, to the bit; float32 CPU tensors whose last
        stride is 1. The outputs keep the inputs' layouts."""
        q_out, k_out = torch.empty_like(q), torch.empty_like(k)
        strides = (ctypes.c_int64 * 12)(*q.stride()[:3], *q_out.stride()[:3], *k.stride()[:3], *k_out.stride()[:3])
        B, H, T, D = q.shape
        self._rope(q.data_ptr(), k.data_ptr(), cos.data_ptr(), sin.data_ptr(), q_out.data_ptr(), k_out.data_ptr(),
                   B, H, k.shape[1], T, D, strides, cos.stride(0) if cos.shape[0] > 1 else 0)
        return q_out, k_out

    def __call__(self, x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
        """``(R, O)`` = ``x (R, I) @ weight (O, I)^T + bias (O,)``: contiguous float32 CPU tensors, ``R <= MAX_ROWS``."""
        rows, width = x.shape
        out = torch.empty(rows, weight.shape[0], dtype=x.dtype)
        status = self._fn(x.data_ptr(), weight.data_ptr(), 0 if bias is None else bias.data_ptr(), out.data_ptr(),
                          rows, weight.shape[0], width, torch.get_num_threads())
        if status:
            raise ValueError(f"native product given {rows} rows: it takes 1..{MAX_ROWS}")
        return out


def cache_dir() -> Path:
    """Where built products are kept: ``$SPECDEC_CACHE``, else ``$XDG_CACHE_HOME/specdec``, else ``~/.cache/specdec``."""
    if os.environ.get("SPECDEC_CACHE"):
        return Path(os.environ["SPECDEC_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "specdec"


def _compiler() -> str | None:
    for name in (os.environ.get("CXX"), "g++", "c++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _cpu() -> str:
    """What ``-march=native`` depends on: the CPU's model and flags."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    lines = [line for line in info.splitlines() if line.startswith(("model name", "flags"))]
    return "\n".join(sorted(set(lines)))


def build(directory: Path | None = None) -> Path:
    """Compile the product into ``directory`` (default :func:`cache_dir`) unless built already; its path.

    Raises ``RuntimeError`` naming the compiler's complaint when it cannot be built."""
    compiler = _compiler()
    if compiler is None:
        raise RuntimeError("no C++ compiler found (set $CXX, or install g++)")
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout.splitlines()[:1]
    key = hashlib.sha256("\0".join([SOURCE, *FLAGS, *version, _cpu(), platform.machine()]).encode()).hexdigest()[:16]
    directory = Path(directory or cache_dir())
    path = directory / f"rows_linear-{key}.so"
    if path.exists():
        return path
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=directory) as tmp:
        source = Path(tmp) / "rows_linear.cpp"
        source.write_text(SOURCE)
        built = Path(tmp) / path.name
        done = subprocess.run([compiler, *FLAGS, str(source), "-o", str(built)], capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"{compiler} failed: {done.stderr.strip()[-2000:]}")
        os.replace(built, path)  # atomic: a concurrent builder's file is the same bytes
    return path


class _Loader:
    """Builds and loads the product once per process; the outcome (the product or ``None``) is kept."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._done = False
        self._product: RowsLinear | None = None

    def __call__(self) -> RowsLinear | None:
        if self._done:
            return self._product
        with self._lock:
            if not self._done:
                self._product = self._load()
                self._done = True
        return self._product

    @staticmethod
    def _load() -> RowsLinear | None:
        if os.environ.get("SPECDEC_NATIVE", "1") == "0":
            reason = "SPECDEC_NATIVE=0"
        elif platform.system() != "Linux":
            reason = f"it is built for Linux only, and this is {platform.system()}"
        else:
            try:
                return RowsLinear(build())
            except (RuntimeError, OSError) as err:
                reason = str(err)
        warnings.warn(f"specdec: the native CPU product is unavailable ({reason}); decoding uses the pure-torch "
                      "products (specdec.backends.cpu_linear), which are slower for 1-8 rows, and the model's own "
                      "norms and rotary embeddings (specdec.backends.fused)", RuntimeWarning, stacklevel=3)
        return None


load = _Loader()  # the process's native product, or None (warns once when it cannot be had)
