/* Shared device helpers for the kernels in csrc/: the quant-state view, absmax decoding, code-table
 * lookups, dtype packing and the inline-PTX wrappers (mma.sync, ldmatrix, cp.async).
 *
 * Rounding rules (the spec is qlora_engine/quant/nf4.py):
 *  - nested absmax: fl(fl(nested_code[q] * nested_absmax[b / 256]) + offset): two roundings, so
 *    __fmul_rn/__fadd_rn, which the compiler may not contract into an FMA;
 *  - a weight value: T(fl(code[c] * absmax)): one float32 product (__fmul_rn), then one
 *    round-to-nearest-even conversion to bf16/fp16 (or none for float32).
 * Nothing here may be built with --use_fast_math or -ftz=true: denormal scales must stay exact.
 */
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include <algorithm>

#include "qlora_engine.h"

namespace qe {

constexpr int kLog2NestedBlock = 8;  // nf4.NESTED_BLOCKSIZE == 256

// Device-side view of a QeQuant, passed to kernels by value.
struct Quant {
  const uint8_t* packed;
  const float* absmax_f32;  // set when not nested
  const uint8_t* absmax_u8;  // set when nested
  const float* code;
  const float* nested_absmax;
  const float* nested_code;
  float offset;
  int log2bs;
  int64_t rows, cols;
};

// Host: validate a QeQuant and build the device view; returns QE_OK or an error code.
inline int make_quant(const QeQuant* in, Quant* out) {
  if (!in || !in->packed || !in->absmax || !in->code || in->rows < 0 || in->cols < 0) return QE_ERR_ARG;
  int bs = in->blocksize, lg = 0;
  while ((1 << lg) < bs) ++lg;
  if (bs < 32 || bs > 4096 || (1 << lg) != bs) return QE_ERR_UNSUPPORTED;
  bool nested = in->nested_absmax != nullptr;
  if (nested && !in->nested_code) return QE_ERR_ARG;
  out->packed = in->packed;
  out->absmax_f32 = nested ? nullptr : static_cast<const float*>(in->absmax);
  out->absmax_u8 = nested ? static_cast<const uint8_t*>(in->absmax) : nullptr;
  out->code = in->code;
  out->nested_absmax = in->nested_absmax;
  out->nested_code = in->nested_code;
  out->offset = in->offset;
  out->log2bs = lg;
  out->rows = in->rows;
  out->cols = in->cols;
  return QE_OK;
}

inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

// The absmax of one block, split in two so its loads can be issued long before it is needed.
// qi < 0: `a` is already the scale (not nested, or a padding chunk with scale 0).
struct ScaleRaw {
  float a;
  int qi;
};

__device__ __forceinline__ ScaleRaw load_scale(const Quant& q, int64_t blk) {
  ScaleRaw r;
  if (q.absmax_u8) {
    r.qi = __ldg(q.absmax_u8 + blk);
    r.a = __ldg(q.nested_absmax + (blk >> kLog2NestedBlock));
  } else {
    r.qi = -1;
    r.a = __ldg(q.absmax_f32 + blk);
  }
  return r;
}

__device__ __forceinline__ ScaleRaw zero_scale() { return ScaleRaw{0.0f, -1}; }

__device__ __forceinline__ float finish_scale(const Quant& q, ScaleRaw r) {
  if (r.qi < 0) return r.a;
  return __fadd_rn(__fmul_rn(__ldg(q.nested_code + r.qi), r.a), q.offset);
}

// The 16-entry code table goes to shared memory: 16 words in 16 distinct banks, so a warp's
// lookups never conflict (equal indices broadcast).
__device__ __forceinline__ void load_code_table(const Quant& q, float* lut) {
  if (threadIdx.x < 16) lut[threadIdx.x] = __ldg(q.code + threadIdx.x);
}

// One element of W by flat index (generic kernels and tails), as float32 before the dtype rounding.
__device__ __forceinline__ float dq_element(const Quant& q, const float* lut, int64_t e) {
  uint32_t b = __ldg(q.packed + (e >> 1));
  uint32_t c = (e & 1) ? (b & 15u) : (b >> 4);
  return __fmul_rn(lut[c], finish_scale(q, load_scale(q, e >> q.log2bs)));
}

// ---- dtypes -------------------------------------------------------------------------------------

template <typename T> struct DT;
template <> struct DT<float> {
  __device__ static float round(float v) { return v; }
  __device__ static float to_float(float v) { return v; }
  __device__ static float from_float(float v) { return v; }
};
template <> struct DT<__nv_bfloat16> {
  __device__ static float round(float v) { return __bfloat162float(__float2bfloat16_rn(v)); }
  __device__ static float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
  __device__ static __nv_bfloat16 from_float(float v) { return __float2bfloat16_rn(v); }
  // low 16 bits = lo: the element with the smaller index, as the mma fragments expect.
  __device__ static uint32_t pack(float lo, float hi) {
    __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
  }
};
template <> struct DT<__half> {
  __device__ static float round(float v) { return __half2float(__float2half_rn(v)); }
  __device__ static float to_float(__half v) { return __half2float(v); }
  __device__ static __half from_float(float v) { return __float2half_rn(v); }
  __device__ static uint32_t pack(float lo, float hi) {
    __half2 h = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
  }
};

__device__ __forceinline__ uint32_t byte_of(const uint4& w, int i) {
  const uint32_t word = i < 4 ? w.x : i < 8 ? w.y : i < 12 ? w.z : w.w;  // i is a compile-time constant
  return (word >> (8 * (i & 3))) & 0xffu;
}

// Two dequantized values of one packed byte (high nibble first), packed as T2, one rounding each.
template <typename T>
__device__ __forceinline__ uint32_t dq_pair(const float* lut, uint32_t b, float s) {
  return DT<T>::pack(__fmul_rn(lut[b >> 4], s), __fmul_rn(lut[b & 15u], s));
}

// ---- memory -------------------------------------------------------------------------------------

// Packed weights are read exactly once: keep them out of L1 so X (reused by every block) stays there.
__device__ __forceinline__ uint4 ld_stream16(const void* p) {
  uint4 v;
  asm("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
      : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
      : "l"(p));
  return v;
}

__device__ __forceinline__ uint2 ld_stream8(const void* p) {
  uint2 v;
  asm("ld.global.nc.L1::no_allocate.v2.u32 {%0, %1}, [%2];" : "=r"(v.x), "=r"(v.y) : "l"(p));
  return v;
}

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte async copy global -> shared; src_bytes = 0 zero-fills (out-of-range rows/columns).
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(smem)), "l"(gmem), "r"(src_bytes)
               : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// ---- tensor cores -------------------------------------------------------------------------------

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* smem) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(smem))
               : "memory");
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* smem) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(smem))
               : "memory");
}

// D += A(16x16, row) * B(16x8, col), fp32 accumulators. Fragment ownership (g = lane/4, t = lane%4):
//   a0: A[g][2t..2t+1]  a1: A[g+8][2t..]  a2: A[g][2t+8..]  a3: A[g+8][2t+8..]
//   b0: B[2t..2t+1][g]  b1: B[2t+8..2t+9][g]
//   d0,d1: D[g][2t], D[g][2t+1]   d2,d3: D[g+8][2t], D[g+8][2t+1]
template <typename T> struct Mma;
template <> struct Mma<__nv_bfloat16> {
  __device__ static void run(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};
template <> struct Mma<__half> {
  __device__ static void run(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};

// ---- host ---------------------------------------------------------------------------------------

inline cudaStream_t as_stream(int64_t s) { return reinterpret_cast<cudaStream_t>(static_cast<intptr_t>(s)); }

inline int sm_count() {
  int dev = 0, n = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess)
    return 108;
  return n;
}

// Launch status: the launch error if any (a kernel's own faults surface at the next sync).
inline int launch_status() { return static_cast<int>(cudaGetLastError()); }

}  // namespace qe
