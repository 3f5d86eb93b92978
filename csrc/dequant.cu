/* Dequantize a packed 4-bit (NF4/FP4) weight to float32, float16 or bfloat16.
 *
 * Reference: qlora_engine/quant/ops.py::ref_dequantize_4bit (-> nf4.dequantize_codes_4bit and, with double
 * quantization, nf4.dequantize_absmax). Must be BIT-EXACT with it.
 *
 * Layout: W flattened row-major, n = rows*cols elements; byte j holds element 2j (high nibble) and
 * 2j+1 (low nibble); an odd n leaves the last low nibble unused. Block b = elements
 * [b*blocksize, (b+1)*blocksize), the last one possibly partial; blocks may straddle rows.
 * absmax: float32 [nblocks], or uint8 [nblocks] decoded as
 *   fl(fl(nested_code[q] * nested_absmax[b >> 8]) + offset)   (two roundings, no FMA).
 * Output element e: out_dtype(fl(code[c_e] * absmax[e / blocksize])), one rounding (none for fp32).
 *
 * Algorithm: memory-bound (reads 0.5 byte, writes 2 or 4 bytes per element), so each thread takes
 * one 16-byte load of packed codes = 32 elements. With blocksize >= 32 and a chunk start that is a
 * multiple of 32, the whole chunk lies in one block: one absmax decode per thread. The output goes
 * out as 16-byte stores (64 bytes per thread for bf16/fp16, 128 for fp32). The < 32 elements that
 * do not fill a chunk, and every element when a pointer is not 16-byte aligned, take a scalar path.
 */
#include "common.h"

namespace qe {
namespace {

constexpr int kThreads = 256;

template <typename OutT>
__device__ __forceinline__ void store_chunk(OutT* out, const float* lut, const uint4& w, float s);

template <>
__device__ __forceinline__ void store_chunk<float>(float* out, const float* lut, const uint4& w, float s) {
  float4* o = reinterpret_cast<float4*>(out);
#pragma unroll
  for (int v = 0; v < 8; ++v) {  // 8 stores of 4 elements = 2 bytes each
    const uint32_t b0 = byte_of(w, 2 * v), b1 = byte_of(w, 2 * v + 1);
    o[v] = make_float4(__fmul_rn(lut[b0 >> 4], s), __fmul_rn(lut[b0 & 15u], s), __fmul_rn(lut[b1 >> 4], s),
                       __fmul_rn(lut[b1 & 15u], s));
  }
}

template <typename T16>
__device__ __forceinline__ void store_chunk16(T16* out, const float* lut, const uint4& w, float s) {
  uint4* o = reinterpret_cast<uint4*>(out);
#pragma unroll
  for (int v = 0; v < 4; ++v) {  // 4 stores of 8 elements = 4 bytes each
    o[v] = make_uint4(dq_pair<T16>(lut, byte_of(w, 4 * v), s), dq_pair<T16>(lut, byte_of(w, 4 * v + 1), s),
                      dq_pair<T16>(lut, byte_of(w, 4 * v + 2), s), dq_pair<T16>(lut, byte_of(w, 4 * v + 3), s));
  }
}
template <>
__device__ __forceinline__ void store_chunk<__nv_bfloat16>(__nv_bfloat16* out, const float* lut, const uint4& w,
                                                          float s) {
  store_chunk16(out, lut, w, s);
}
template <>
__device__ __forceinline__ void store_chunk<__half>(__half* out, const float* lut, const uint4& w, float s) {
  store_chunk16(out, lut, w, s);
}

// Threads [0, nchunks) take one 32-element chunk each; threads [nchunks, nchunks + tail) one element.
template <typename OutT>
__global__ void __launch_bounds__(kThreads) dequant_vec_kernel(Quant q, OutT* __restrict__ out, int64_t n) {
  __shared__ float lut[16];
  load_code_table(q, lut);
  __syncthreads();
  const int64_t nchunks = n >> 5;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (t < nchunks) {
    const uint4 w = ld_stream16(q.packed + 16 * t);
    const float s = finish_scale(q, load_scale(q, (32 * t) >> q.log2bs));
    store_chunk<OutT>(out + 32 * t, lut, w, s);
  } else {
    const int64_t e = 32 * nchunks + (t - nchunks);
    if (e < n) out[e] = DT<OutT>::from_float(dq_element(q, lut, e));
  }
}

// Any alignment: one element per thread (grid-stride, so huge n never overflows the grid).
template <typename OutT>
__global__ void __launch_bounds__(kThreads) dequant_scalar_kernel(Quant q, OutT* __restrict__ out, int64_t n) {
  __shared__ float lut[16];
  load_code_table(q, lut);
  __syncthreads();
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; e < n; e += stride)
    out[e] = DT<OutT>::from_float(dq_element(q, lut, e));
}

template <typename OutT>
int launch(const Quant& q, void* out, cudaStream_t stream) {
  const int64_t n = q.rows * q.cols;
  if (n == 0) return QE_OK;
  OutT* o = static_cast<OutT*>(out);
  if (aligned16(q.packed) && aligned16(out)) {
    const int64_t threads = (n >> 5) + (n & 31);
    const int64_t blocks = (threads + kThreads - 1) / kThreads;
    if (blocks > 0x7fffffff) return QE_ERR_UNSUPPORTED;
    dequant_vec_kernel<OutT><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(q, o, n);
  } else {
    const int64_t blocks = std::min<int64_t>((n + kThreads - 1) / kThreads, 65536);
    dequant_scalar_kernel<OutT><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(q, o, n);
  }
  return launch_status();
}

}  // namespace
}  // namespace qe

extern "C" QE_EXPORT int qe_dequantize_4bit(const QeQuant* qin, void* out, int out_dtype, int64_t stream) {
  qe::Quant q;
  int err = qe::make_quant(qin, &q);
  if (err) return err;
  if (!out) return QE_ERR_ARG;
  cudaStream_t s = qe::as_stream(stream);
  switch (out_dtype) {
    case QE_F32: return qe::launch<float>(q, out, s);
    case QE_F16: return qe::launch<__half>(q, out, s);
    case QE_BF16: return qe::launch<__nv_bfloat16>(q, out, s);
    default: return QE_ERR_UNSUPPORTED;
  }
}
