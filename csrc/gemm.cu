/* Large-M products with a packed 4-bit weight, fused: W tiles are dequantized into shared memory
 * and fed to the tensor cores, so the bf16 weight never exists in global memory.
 *
 *   forward   y[M, N]  = x[M, K]  . dequant(W)^T     reference: quant/ops.py::ref_matmul_4bit
 *   backward  dx[M, K] = dy[M, N] . dequant(W)       reference: quant/ops.py::ref_matmul_4bit_t
 *
 * One kernel for both: C[M, P] = A[M, R] . B[R, P] with the reduction R = K, P = N, B = W^T
 * (forward) or R = N, P = K, B = W (backward). A, C row-major bf16/fp16; fp32 accumulation; every
 * weight element is rounded exactly as the spec does (T(fl(code[c] * absmax))), so the result
 * differs from dequantize + cuBLAS only in summation order.
 *
 * Tiles: block 128 (M) x 128 (P) x 64 (R), 8 warps as 2 x 4, each warp 64 x 32 = 4 x 4 mma.sync
 * m16n8k16 tiles. Shared memory keeps W as it lies in memory, rows = n, columns = k (bf16, rows
 * padded by 16 bytes so ldmatrix is conflict-free): forward reads its B fragments with ldmatrix,
 * backward with ldmatrix.trans.
 * Pipeline: A comes in through cp.async, 3 stages; W is prefetched one stage ahead into registers
 * (one 16-byte load of 32 codes plus one absmax per thread), then decoded into one of two shared
 * buffers while the previous stage's mma run.
 * Covers K % 32 == 0 (a thread's 32 codes lie in one absmax block and never straddle rows),
 * N % 8 == 0 (16-byte cp.async rows of dy) and 16-byte-aligned pointers; anything else returns
 * QE_ERR_UNSUPPORTED and the caller dequantizes + uses cuBLAS instead.
 *
 * This is mma.sync, not Hopper's wgmma: on an H100/H200 expect it below cuBLAS, which is why the
 * Python dispatcher uses dequantize + cuBLAS for large M until a measurement says otherwise.
 */
#include <atomic>

#include "common.h"

namespace qe {
namespace {

constexpr int BM = 128, BP = 128, BR = 64, PAD = 8, kThreads = 256, kAStages = 3;
constexpr int ALD = BR + PAD;  // A tile row pitch, elements

template <bool BWD> struct WTile {
  static constexpr int ROWS = BWD ? BR : BP;  // n extent
  static constexpr int COLS = BWD ? BP : BR;  // k extent
  static constexpr int LD = COLS + PAD;
  static constexpr int CHUNKS_PER_ROW = COLS / 32;
};

template <typename T, bool BWD>
constexpr int smem_bytes() {
  return static_cast<int>(sizeof(T)) * (kAStages * BM * ALD + 2 * WTile<BWD>::ROWS * WTile<BWD>::LD);
}

template <typename T, bool BWD>
__global__ void __launch_bounds__(kThreads, 2) gemm_kernel(Quant q, const T* __restrict__ a, int64_t M, T* __restrict__ c) {
  using W = WTile<BWD>;
  extern __shared__ uint4 smem_raw[];
  T* As = reinterpret_cast<T*>(smem_raw);
  T* Ws = As + kAStages * BM * ALD;
  __shared__ float lut[16];

  const int64_t N = q.rows, K = q.cols;
  const int64_t P = BWD ? K : N, R = BWD ? N : K;
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * BM, p0 = static_cast<int64_t>(blockIdx.x) * BP;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, wm = warp >> 2, wp = warp & 3;
  const int KT = static_cast<int>((R + BR - 1) / BR);

  load_code_table(q, lut);

  auto load_a = [&](int kt, int stage) {
    T* dst = As + stage * BM * ALD;
    const int64_t r0 = static_cast<int64_t>(kt) * BR;
#pragma unroll
    for (int i = 0; i < BM * BR / 8 / kThreads; ++i) {
      const int ch = tid + i * kThreads, row = ch >> 3, col = (ch & 7) * 8;
      const int64_t gm = m0 + row, gr = r0 + col;
      const bool ok = gm < M && gr < R;  // R % 8 == 0: a chunk is all in or all out
      cp_async16(dst + row * ALD + col, ok ? a + gm * R + gr : a, ok ? 16 : 0);
    }
  };

  // This thread's W chunk: 32 consecutive k of one row n.
  const int w_row = tid / W::CHUNKS_PER_ROW, w_col = (tid % W::CHUNKS_PER_ROW) * 32;
  uint4 wreg;
  ScaleRaw wscale;
  auto load_w = [&](int kt) {
    const int64_t r0 = static_cast<int64_t>(kt) * BR;
    const int64_t n = BWD ? r0 + w_row : p0 + w_row;
    const int64_t k = BWD ? p0 + w_col : r0 + w_col;
    wreg = make_uint4(0, 0, 0, 0);
    wscale = zero_scale();  // padding rows/columns decode to +-0
    if (n < N && k < K) {
      const int64_t e = n * K + k;
      wreg = ld_stream16(q.packed + (e >> 1));
      wscale = load_scale(q, e >> q.log2bs);
    }
  };
  auto store_w = [&](int buf) {
    const float s = finish_scale(q, wscale);
    uint4* dst = reinterpret_cast<uint4*>(Ws + buf * W::ROWS * W::LD + w_row * W::LD + w_col);
#pragma unroll
    for (int v = 0; v < 4; ++v)
      dst[v] = make_uint4(dq_pair<T>(lut, byte_of(wreg, 4 * v), s), dq_pair<T>(lut, byte_of(wreg, 4 * v + 1), s),
                          dq_pair<T>(lut, byte_of(wreg, 4 * v + 2), s), dq_pair<T>(lut, byte_of(wreg, 4 * v + 3), s));
  };

  float acc[4][4][4] = {};

  auto compute = [&](int astage, int wbuf) {
    const T* At = As + astage * BM * ALD;
    const T* Wt = Ws + wbuf * W::ROWS * W::LD;
#pragma unroll
    for (int kk = 0; kk < BR / 16; ++kk) {
      uint32_t af[4][4], bf[4][2];
#pragma unroll
      for (int mi = 0; mi < 4; ++mi)
        ldmatrix_x4(af[mi], At + (wm * 64 + mi * 16 + (lane & 15)) * ALD + kk * 16 + (lane >> 4) * 8);
#pragma unroll
      for (int pj = 0; pj < 2; ++pj) {
        uint32_t r[4];
        if (BWD) {  // rows = reduction n, columns = output k: transpose on load
          const int rr = kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8;
          const int cc = wp * 32 + pj * 16 + (lane >> 4) * 8;
          ldmatrix_x4_trans(r, Wt + rr * W::LD + cc);
        } else {  // rows = output n, columns = reduction k
          const int rr = wp * 32 + pj * 16 + (lane & 7) + (lane >> 4) * 8;
          const int cc = kk * 16 + ((lane >> 3) & 1) * 8;
          ldmatrix_x4(r, Wt + rr * W::LD + cc);
        }
        bf[2 * pj][0] = r[0];
        bf[2 * pj][1] = r[1];
        bf[2 * pj + 1][0] = r[2];
        bf[2 * pj + 1][1] = r[3];
      }
#pragma unroll
      for (int mi = 0; mi < 4; ++mi)
#pragma unroll
        for (int ni = 0; ni < 4; ++ni) Mma<T>::run(acc[mi][ni], af[mi], bf[ni][0], bf[ni][1]);
    }
  };

  // Prologue: A stages 0 and 1 in flight, W stage 0 decoded, W stage 1 in registers.
  load_a(0, 0);
  cp_async_commit();
  if (KT > 1) load_a(1, 1);
  cp_async_commit();
  load_w(0);
  __syncthreads();  // lut
  store_w(0);
  if (KT > 1) load_w(1);

  for (int kt = 0; kt < KT; ++kt) {
    cp_async_wait<1>();  // A stage kt has landed (stage kt+1 may still be in flight)
    __syncthreads();     // ... for every thread; and everyone is done with iteration kt-1's buffers
    if (kt + 2 < KT) load_a(kt + 2, (kt + 2) % kAStages);
    cp_async_commit();  // possibly empty: keeps the group count in step with kt
    if (kt + 1 < KT) {
      store_w((kt + 1) & 1);
      if (kt + 2 < KT) load_w(kt + 2);
    }
    compute(kt % kAStages, kt & 1);
  }

  const int g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int mi = 0; mi < 4; ++mi)
#pragma unroll
    for (int ni = 0; ni < 4; ++ni) {
      const int64_t p = p0 + wp * 32 + ni * 8 + 2 * t;  // P is even, so p < P implies p + 1 < P
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int64_t m = m0 + wm * 64 + mi * 16 + g + 8 * h;
        if (m < M && p < P)
          *reinterpret_cast<uint32_t*>(c + m * P + p) = DT<T>::pack(acc[mi][ni][2 * h], acc[mi][ni][2 * h + 1]);
      }
    }
}

template <typename T, bool BWD>
int launch(const Quant& q, const void* av, int64_t M, void* cv, cudaStream_t s) {
  const int64_t N = q.rows, K = q.cols;
  const int64_t P = BWD ? K : N, R = BWD ? N : K;
  if (K % 32 != 0 || N % 8 != 0 || !aligned16(q.packed) || !aligned16(av) || !aligned16(cv)) return QE_ERR_UNSUPPORTED;
  if (M == 0 || P == 0) return QE_OK;
  if (R == 0) return static_cast<int>(cudaMemsetAsync(cv, 0, sizeof(T) * M * P, s));
  const int64_t gx = (P + BP - 1) / BP, gy = (M + BM - 1) / BM;
  if (gx > 0x7fffffff || gy > 65535) return QE_ERR_UNSUPPORTED;
  constexpr int bytes = smem_bytes<T, BWD>();
  // Above 48 KB of dynamic shared memory a kernel must opt in, once per device: later calls (in
  // a CUDA-graph capture, say) then issue nothing but the launch.
  static std::atomic<uint64_t> opted_in{0};
  int dev = 0;
  cudaError_t e = cudaGetDevice(&dev);
  if (e != cudaSuccess) return static_cast<int>(e);
  const uint64_t bit = dev < 64 ? (uint64_t{1} << dev) : 0;
  if (!bit || !(opted_in.load() & bit)) {
    e = cudaFuncSetAttribute(gemm_kernel<T, BWD>, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
    if (e != cudaSuccess) return static_cast<int>(e);
    opted_in.fetch_or(bit);
  }
  gemm_kernel<T, BWD><<<dim3(static_cast<unsigned>(gx), static_cast<unsigned>(gy)), kThreads, bytes, s>>>(
      q, static_cast<const T*>(av), M, static_cast<T*>(cv));
  return launch_status();
}

template <bool BWD>
int dispatch(const QeQuant* qin, const void* a, int dtype, int64_t m, void* c, int64_t stream) {
  Quant q;
  int err = make_quant(qin, &q);
  if (err) return err;
  if (!a || !c || m < 0) return QE_ERR_ARG;
  if (dtype == QE_BF16) return launch<__nv_bfloat16, BWD>(q, a, m, c, as_stream(stream));
  if (dtype == QE_F16) return launch<__half, BWD>(q, a, m, c, as_stream(stream));
  return QE_ERR_UNSUPPORTED;
}

}  // namespace
}  // namespace qe

extern "C" QE_EXPORT int qe_gemm_4bit(const QeQuant* q, const void* x, int dtype, int64_t m, void* y, int64_t stream) {
  return qe::dispatch<false>(q, x, dtype, m, y, stream);
}

extern "C" QE_EXPORT int qe_gemm_4bit_t(const QeQuant* q, const void* dy, int dtype, int64_t m, void* dx,
                                        int64_t stream) {
  return qe::dispatch<true>(q, dy, dtype, m, dx, stream);
}
