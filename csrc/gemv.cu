/* Small-M products with a packed 4-bit weight (M = 1..16 rows: generation, tiny batches).
 *
 *   forward   y[M, N]  = x[M, K]  . dequant(W)^T     reference: quant/ops.py::ref_matmul_4bit
 *   backward  dx[M, K] = dy[M, N] . dequant(W)       reference: quant/ops.py::ref_matmul_4bit_t
 *
 * W [N, K] in bitsandbytes' layout (see dequant.cu). x, dy, y, dx: row-major, all bf16 or all fp16.
 * Every weight value is first rounded exactly as the spec does, T(fl(code[c] * absmax)), then
 * multiplied in the tensor cores with fp32 accumulation; only the summation order differs from
 * the reference (dequantize + cuBLAS), so results agree to bf16/fp16 accuracy, not bit for bit.
 *
 * Both directions are bound by reading the packed weight (0.5 byte per element), so each weight
 * byte is loaded once (16- or 8-byte streaming loads) and used for all M rows at once through
 * mma.sync m16n8k16: W is the 16-row A operand and x (or dy) the 8-column B operand (one or two
 * n8 tiles for M <= 8 / M <= 16), so the arithmetic never limits. The tensor-core dot product
 * leaves the ALUs only the decode: one shared-memory table lookup, one multiply and half a
 * conversion per element.
 *
 * The reduction index of the mma may be permuted freely as long as A and B use the same
 * permutation; that lets every lane's A fragments come from ONE contiguous 16-byte run of a
 * weight row (forward) or from 8-byte runs of 4 rows (backward) without any shuffles:
 *  forward, lane (g = lane/4, t = lane%4) at k-step `it`: rows n0+g and n0+g+8, elements
 *    kc = it*128 + 32t .. +32. mma j (0..7) uses bytes 2j and 2j+1 of each row's 16 bytes (logical
 *    columns 2t,2t+1 -> physical kc+4j+{0,1}; 2t+8,2t+9 -> kc+4j+{2,3}), so its B fragment is words
 *    2j and 2j+1 of x[m, kc:kc+32] read as 32-bit pairs.
 *  backward (A = W^T: rows = k, columns = n): lane (g, t) holds rows n = nb+2t, nb+2t+1, nb+2t+8,
 *    nb+2t+9 and elements kc = strip + 16g .. +16; mma tt (0..7) takes byte tt of each: its
 *    logical row g is k = kc+2tt (high nibbles), row g+8 is k = kc+2tt+1 (low nibbles).
 * These fast paths need K % 32 == 0 and a 16-byte-aligned packed weight and x, so that a lane's
 * run lies inside one absmax block (blocksize >= 32): one absmax decode per run. Other shapes
 * (odd K, odd N, ...) take the generic kernels below: one element at a time, slow but exact.
 *
 * Forward: one block per 16 weight rows; its warps split K and are summed in a fixed order
 * (deterministic). Backward: one block per 128-column strip of K and per slice of N; blocks of
 * one strip add fp32 partial sums with atomics into a workspace, and the last block to finish
 * converts the strip to T (so the fp32 summation order, not the result's accuracy, varies
 * between runs).
 */
#include "common.h"

namespace qe {
namespace {

constexpr int kMaxM = 16;

__device__ __forceinline__ uint32_t word_of(const uint4 (&v)[4], int i) {
  const uint4& u = v[i >> 2];
  return (i & 3) == 0 ? u.x : (i & 3) == 1 ? u.y : (i & 3) == 2 ? u.z : u.w;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// ---- forward, tensor cores ---------------------------------------------------------------------

struct FwdStage {
  uint4 wa, wb;
  ScaleRaw sa, sb;
};

template <typename T, int NT, int WARPS>
__global__ void __launch_bounds__(WARPS * 32) gemv_fwd_tc(Quant q, const T* __restrict__ x, int M, T* __restrict__ y) {
  __shared__ float lut[16];
  __shared__ float red[WARPS][NT * 4][32];
  load_code_table(q, lut);
  __syncthreads();

  const int64_t N = q.rows, K = q.cols;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * 16;
  const int64_t ra = n0 + g, rb = ra + 8;
  const bool va = ra < N, vb = rb < N;
  const int iters = static_cast<int>((K + 127) >> 7);
  float acc[NT][4] = {};

  // Padding (rows >= N, columns >= K) gets scale 0, so its weights are +-0, never code[0]*absmax.
  auto load = [&](int it, FwdStage& s) {
    const int64_t kc = static_cast<int64_t>(it) * 128 + t * 32;
    const bool kin = kc < K;
    const int64_t ea = ra * K + kc, eb = rb * K + kc;
    s.wa = make_uint4(0, 0, 0, 0);
    s.wb = s.wa;
    s.sa = zero_scale();
    s.sb = s.sa;
    if (va && kin) {
      s.wa = ld_stream16(q.packed + (ea >> 1));
      s.sa = load_scale(q, ea >> q.log2bs);
    }
    if (vb && kin) {
      s.wb = ld_stream16(q.packed + (eb >> 1));
      s.sb = load_scale(q, eb >> q.log2bs);
    }
  };

  auto compute = [&](int it, const FwdStage& s) {
    const int64_t kc = static_cast<int64_t>(it) * 128 + t * 32;
    const bool kin = kc < K;
    const float sa = finish_scale(q, s.sa), sb = finish_scale(q, s.sb);
    uint4 xv[NT][4];
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      const int m = nt * 8 + g;
      if (kin && m < M) {
        const uint4* xp = reinterpret_cast<const uint4*>(x + m * K + kc);
#pragma unroll
        for (int i = 0; i < 4; ++i) xv[nt][i] = __ldg(xp + i);
      } else {
#pragma unroll
        for (int i = 0; i < 4; ++i) xv[nt][i] = make_uint4(0, 0, 0, 0);
      }
    }
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const uint32_t a[4] = {dq_pair<T>(lut, byte_of(s.wa, 2 * j), sa), dq_pair<T>(lut, byte_of(s.wb, 2 * j), sb),
                             dq_pair<T>(lut, byte_of(s.wa, 2 * j + 1), sa),
                             dq_pair<T>(lut, byte_of(s.wb, 2 * j + 1), sb)};
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) Mma<T>::run(acc[nt], a, word_of(xv[nt], 2 * j), word_of(xv[nt], 2 * j + 1));
    }
  };

  // Two stages in registers: the next k-step's weight loads are in flight during this one's math.
  if (warp < iters) {
    FwdStage cur, nxt;
    load(warp, cur);
    for (int it = warp; it < iters; it += WARPS) {
      const bool more = it + WARPS < iters;
      if (more) load(it + WARPS, nxt);
      compute(it, cur);
      if (more) cur = nxt;
    }
  }

#pragma unroll
  for (int nt = 0; nt < NT; ++nt)
#pragma unroll
    for (int i = 0; i < 4; ++i) red[warp][nt * 4 + i][lane] = acc[nt][i];
  __syncthreads();
  for (int idx = threadIdx.x; idx < NT * 4 * 32; idx += WARPS * 32) {
    const int li = idx & 31, slot = idx >> 5;
    float v = 0.0f;
#pragma unroll
    for (int w = 0; w < WARPS; ++w) v += red[w][slot][li];
    const int nt = slot >> 2, i = slot & 3;
    const int64_t n = n0 + (li >> 2) + 8 * (i >> 1);
    const int m = nt * 8 + 2 * (li & 3) + (i & 1);
    if (m < M && n < N) y[m * N + n] = DT<T>::from_float(v);
  }
}

// ---- backward, tensor cores --------------------------------------------------------------------

struct BwdStage {
  uint2 w[4];
  ScaleRaw s[4];
};

constexpr int kStrip = 128;  // K columns per block: 8 lane groups x 16

template <typename T, int NT, int WARPS>
__global__ void __launch_bounds__(WARPS * 32)
    gemv_bwd_tc(Quant q, const T* __restrict__ dy, int M, float* __restrict__ ws, unsigned* __restrict__ counters,
                T* __restrict__ dx, int64_t slabs_per_split) {
  __shared__ float lut[16];
  __shared__ float red[WARPS / 2][NT * 32][32];
  __shared__ bool s_last;
  load_code_table(q, lut);
  __syncthreads();

  const int64_t N = q.rows, K = q.cols;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
  const int64_t kc = static_cast<int64_t>(blockIdx.x) * kStrip + g * 16;
  const bool kin = kc < K;
  const int64_t nslabs = (N + 15) >> 4;
  const int64_t s_begin = static_cast<int64_t>(blockIdx.y) * slabs_per_split;
  const int64_t s_end = s_begin + slabs_per_split < nslabs ? s_begin + slabs_per_split : nslabs;
  const unsigned short* dyu = reinterpret_cast<const unsigned short*>(dy);
  float acc[NT][8][4] = {};

  auto row = [&](int64_t slab, int i) { return slab * 16 + 2 * t + (i & 1) + 8 * (i >> 1); };

  auto load = [&](int64_t slab, BwdStage& s) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int64_t r = row(slab, i), e = r * K + kc;
      s.w[i] = make_uint2(0, 0);
      s.s[i] = zero_scale();
      if (r < N && kin) {
        s.w[i] = ld_stream8(q.packed + (e >> 1));
        s.s[i] = load_scale(q, e >> q.log2bs);
      }
    }
  };

  auto compute = [&](int64_t slab, const BwdStage& s) {
    float sc[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) sc[i] = finish_scale(q, s.s[i]);
    uint32_t b[NT][2];
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      const int m = nt * 8 + g;
      uint32_t v[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int64_t r = row(slab, i);
        v[i] = (m < M && r < N) ? __ldg(dyu + m * N + r) : 0u;
      }
      b[nt][0] = v[0] | (v[1] << 16);
      b[nt][1] = v[2] | (v[3] << 16);
    }
#pragma unroll
    for (int tt = 0; tt < 8; ++tt) {
      float hi[4], lo[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const uint32_t by = ((tt < 4 ? s.w[i].x : s.w[i].y) >> (8 * (tt & 3))) & 0xffu;
        hi[i] = __fmul_rn(lut[by >> 4], sc[i]);
        lo[i] = __fmul_rn(lut[by & 15u], sc[i]);
      }
      const uint32_t a[4] = {DT<T>::pack(hi[0], hi[1]), DT<T>::pack(lo[0], lo[1]), DT<T>::pack(hi[2], hi[3]),
                             DT<T>::pack(lo[2], lo[3])};
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) Mma<T>::run(acc[nt][tt], a, b[nt][0], b[nt][1]);
    }
  };

  if (s_begin + warp < s_end) {
    BwdStage cur, nxt;
    load(s_begin + warp, cur);
    for (int64_t slab = s_begin + warp; slab < s_end; slab += WARPS) {
      const bool more = slab + WARPS < s_end;
      if (more) load(slab + WARPS, nxt);
      compute(slab, cur);
      if (more) cur = nxt;
    }
  }

  // Tree reduction over the warps (fixed order); warp 0 ends with the block's sums.
  for (int h = WARPS / 2; h >= 1; h >>= 1) {
    if (warp >= h && warp < 2 * h) {
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int tt = 0; tt < 8; ++tt)
#pragma unroll
          for (int i = 0; i < 4; ++i) red[warp - h][(nt * 8 + tt) * 4 + i][lane] = acc[nt][tt][i];
    }
    __syncthreads();
    if (warp < h) {
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int tt = 0; tt < 8; ++tt)
#pragma unroll
          for (int i = 0; i < 4; ++i) acc[nt][tt][i] += red[warp][(nt * 8 + tt) * 4 + i][lane];
    }
    __syncthreads();
  }

  const bool split = gridDim.y > 1;
  if (warp == 0) {
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int tt = 0; tt < 8; ++tt)
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const int64_t k = kc + 2 * tt + (i >> 1);
          const int m = nt * 8 + 2 * t + (i & 1);
          if (m < M && k < K) {
            if (split)
              atomicAdd(ws + m * K + k, acc[nt][tt][i]);
            else
              dx[m * K + k] = DT<T>::from_float(acc[nt][tt][i]);
          }
        }
  }
  if (!split) return;

  // The last block of this strip converts the fp32 sums (threadFenceReduction pattern).
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) s_last = atomicAdd(counters + blockIdx.x, 1u) == gridDim.y - 1;
  __syncthreads();
  if (!s_last) return;
  __threadfence();
  const int64_t k0 = static_cast<int64_t>(blockIdx.x) * kStrip;
  for (int idx = threadIdx.x; idx < M * kStrip; idx += WARPS * 32) {
    const int m = idx / kStrip;
    const int64_t k = k0 + idx % kStrip;
    if (k < K) dx[m * K + k] = DT<T>::from_float(__ldcg(ws + m * K + k));
  }
}

// ---- generic (any shape or alignment), exact weights, fp32 accumulation -------------------------

template <typename T>
__global__ void __launch_bounds__(256) gemv_fwd_generic(Quant q, const T* __restrict__ x, int M, T* __restrict__ y) {
  __shared__ float lut[16];
  load_code_table(q, lut);
  __syncthreads();
  const int64_t N = q.rows, K = q.cols;
  const int lane = threadIdx.x & 31;
  const int64_t n = static_cast<int64_t>(blockIdx.x) * 8 + (threadIdx.x >> 5);
  if (n >= N) return;
  float acc[kMaxM] = {};
  for (int64_t k = lane; k < K; k += 32) {
    const float w = DT<T>::round(dq_element(q, lut, n * K + k));
#pragma unroll
    for (int m = 0; m < kMaxM; ++m)
      if (m < M) acc[m] = fmaf(w, DT<T>::to_float(x[m * K + k]), acc[m]);
  }
#pragma unroll
  for (int m = 0; m < kMaxM; ++m) {
    if (m < M) {
      const float v = warp_sum(acc[m]);
      if (lane == 0) y[m * N + n] = DT<T>::from_float(v);
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(256) gemv_bwd_generic(Quant q, const T* __restrict__ dy, int M, T* __restrict__ dx) {
  __shared__ float lut[16];
  load_code_table(q, lut);
  __syncthreads();
  const int64_t N = q.rows, K = q.cols;
  const int64_t k = static_cast<int64_t>(blockIdx.x) * 256 + threadIdx.x;
  if (k >= K) return;
  float acc[kMaxM] = {};
  for (int64_t n = 0; n < N; ++n) {
    const float w = DT<T>::round(dq_element(q, lut, n * K + k));
#pragma unroll
    for (int m = 0; m < kMaxM; ++m)
      if (m < M) acc[m] = fmaf(w, DT<T>::to_float(dy[m * N + n]), acc[m]);
  }
#pragma unroll
  for (int m = 0; m < kMaxM; ++m)
    if (m < M) dx[m * K + k] = DT<T>::from_float(acc[m]);
}

// ---- host ---------------------------------------------------------------------------------------

template <typename T>
int gemv_fwd(const Quant& q, const void* xv, int M, void* yv, cudaStream_t s) {
  const int64_t N = q.rows, K = q.cols;
  const T* x = static_cast<const T*>(xv);
  T* y = static_cast<T*>(yv);
  if (N == 0) return QE_OK;
  if (K == 0) return static_cast<int>(cudaMemsetAsync(y, 0, sizeof(T) * M * N, s));
  if (K % 32 == 0 && aligned16(q.packed) && aligned16(x)) {
    const int64_t blocks = (N + 15) / 16;
    if (blocks > 0x7fffffff) return QE_ERR_UNSUPPORTED;
    // Few row blocks (small N): more warps per block so the K split still fills the machine.
    const bool wide = blocks < sm_count() && K >= 16 * 128;
    const unsigned grid = static_cast<unsigned>(blocks);
    if (M <= 8 && wide)
      gemv_fwd_tc<T, 1, 16><<<grid, 512, 0, s>>>(q, x, M, y);
    else if (M <= 8)
      gemv_fwd_tc<T, 1, 8><<<grid, 256, 0, s>>>(q, x, M, y);
    else if (wide)
      gemv_fwd_tc<T, 2, 16><<<grid, 512, 0, s>>>(q, x, M, y);
    else
      gemv_fwd_tc<T, 2, 8><<<grid, 256, 0, s>>>(q, x, M, y);
  } else {
    const int64_t blocks = (N + 7) / 8;
    if (blocks > 0x7fffffff) return QE_ERR_UNSUPPORTED;
    gemv_fwd_generic<T><<<static_cast<unsigned>(blocks), 256, 0, s>>>(q, x, M, y);
  }
  return launch_status();
}

int64_t bwd_workspace(int64_t M, int64_t K) { return 4 * M * K + 4 * ((K + kStrip - 1) / kStrip); }

template <typename T>
int gemv_bwd(const Quant& q, const void* dyv, int M, void* dxv, void* ws, cudaStream_t s) {
  constexpr int kWarps = 8;
  const int64_t N = q.rows, K = q.cols;
  const T* dy = static_cast<const T*>(dyv);
  T* dx = static_cast<T*>(dxv);
  if (K == 0) return QE_OK;
  if (N == 0) return static_cast<int>(cudaMemsetAsync(dx, 0, sizeof(T) * M * K, s));
  if (K % 32 == 0 && aligned16(q.packed)) {
    const int64_t strips = (K + kStrip - 1) / kStrip, nslabs = (N + 15) / 16;
    if (strips > 0x7fffffff) return QE_ERR_UNSUPPORTED;
    // Enough blocks for about two per multiprocessor; each warp keeps at least one 16-row slab.
    int64_t splits = (2 * sm_count() + strips - 1) / strips;
    splits = std::max<int64_t>(1, std::min<int64_t>(splits, (nslabs + kWarps - 1) / kWarps));
    const int64_t per = (nslabs + splits - 1) / splits;
    splits = (nslabs + per - 1) / per;
    if (splits > 65535) return QE_ERR_UNSUPPORTED;
    float* acc = static_cast<float*>(ws);
    unsigned* counters = nullptr;
    if (splits > 1) {
      if (!ws) return QE_ERR_ARG;
      counters = reinterpret_cast<unsigned*>(acc + M * K);
      cudaError_t e = cudaMemsetAsync(ws, 0, bwd_workspace(M, K), s);
      if (e != cudaSuccess) return static_cast<int>(e);
    }
    const dim3 grid(static_cast<unsigned>(strips), static_cast<unsigned>(splits));
    if (M <= 8)
      gemv_bwd_tc<T, 1, kWarps><<<grid, kWarps * 32, 0, s>>>(q, dy, M, acc, counters, dx, per);
    else
      gemv_bwd_tc<T, 2, kWarps><<<grid, kWarps * 32, 0, s>>>(q, dy, M, acc, counters, dx, per);
  } else {
    const int64_t blocks = (K + 255) / 256;
    if (blocks > 0x7fffffff) return QE_ERR_UNSUPPORTED;
    gemv_bwd_generic<T><<<static_cast<unsigned>(blocks), 256, 0, s>>>(q, dy, M, dx);
  }
  return launch_status();
}

}  // namespace
}  // namespace qe

extern "C" QE_EXPORT int qe_gemv_4bit(const QeQuant* qin, const void* x, int dtype, int64_t m, void* y,
                                      int64_t stream) {
  qe::Quant q;
  int err = qe::make_quant(qin, &q);
  if (err) return err;
  if (m < 1 || m > qe::kMaxM) return QE_ERR_UNSUPPORTED;
  if (!x || !y) return QE_ERR_ARG;
  if (dtype == QE_BF16) return qe::gemv_fwd<__nv_bfloat16>(q, x, static_cast<int>(m), y, qe::as_stream(stream));
  if (dtype == QE_F16) return qe::gemv_fwd<__half>(q, x, static_cast<int>(m), y, qe::as_stream(stream));
  return QE_ERR_UNSUPPORTED;
}

extern "C" QE_EXPORT int64_t qe_gemv_4bit_t_workspace(const QeQuant* qin, int64_t m) {
  return qin ? qe::bwd_workspace(m, qin->cols) : 0;
}

extern "C" QE_EXPORT int qe_gemv_4bit_t(const QeQuant* qin, const void* dy, int dtype, int64_t m, void* dx,
                                        void* workspace, int64_t stream) {
  qe::Quant q;
  int err = qe::make_quant(qin, &q);
  if (err) return err;
  if (m < 1 || m > qe::kMaxM) return QE_ERR_UNSUPPORTED;
  if (!dy || !dx) return QE_ERR_ARG;
  if (dtype == QE_BF16)
    return qe::gemv_bwd<__nv_bfloat16>(q, dy, static_cast<int>(m), dx, workspace, qe::as_stream(stream));
  if (dtype == QE_F16) return qe::gemv_bwd<__half>(q, dy, static_cast<int>(m), dx, workspace, qe::as_stream(stream));
  return QE_ERR_UNSUPPORTED;
}
