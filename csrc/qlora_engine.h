/* The C ABI of libqlora_engine_cuda.so: what qlora_engine/quant/cuda.py calls through ctypes.
 *
 * Plain C types only (raw device pointers, sizes, a cudaStream_t passed as an integer), so the
 * library never links against PyTorch and one build serves every torch version.
 *
 * Every entry point returns 0 on success, a cudaError_t value (1..999) when CUDA failed, or one
 * of the QE_ERR_* codes below; qe_error_string() turns any of them into text. QE_ERR_UNSUPPORTED
 * means "these inputs are not covered by this kernel": the caller falls back to the reference.
 *
 * The weight layout is bitsandbytes' (see qlora_engine/quant/nf4.py, the spec): W [rows, cols] flattened
 * row-major, cut into blocks of `blocksize` elements that may straddle rows, two 4-bit codes per
 * byte (element 2j in the high nibble of byte j, 2j+1 in the low nibble), one absmax per block.
 */
#ifndef QLORA_ENGINE_H
#define QLORA_ENGINE_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define QE_EXPORT __attribute__((visibility("default")))

/* Bump whenever a signature or the QeQuant layout changes; quant/cuda.py refuses a mismatched build. */
#define QE_ABI_VERSION 1

enum { QE_F32 = 0, QE_F16 = 1, QE_BF16 = 2 };

enum {
  QE_OK = 0,
  QE_ERR_UNSUPPORTED = 100001, /* inputs outside what the kernel covers: use the reference */
  QE_ERR_ARG = 100002          /* inconsistent arguments (a bug in the caller) */
};

/* One packed 4-bit weight and its quantization state (quant/ops.py's weight argument group). */
typedef struct {
  const uint8_t* packed;       /* [(rows*cols+1)/2] */
  const void* absmax;          /* float32 [nblocks]; uint8 [nblocks] when nested_absmax != NULL */
  const float* code;           /* float32 [16]: the NF4 or FP4 table */
  const float* nested_absmax;  /* float32 [ceil(nblocks/256)], or NULL when not double-quantized */
  const float* nested_code;    /* float32 [256], or NULL */
  float offset;                /* double-quant offset (0 when not nested) */
  int32_t blocksize;           /* power of two, 32..4096 */
  int64_t rows;                /* N: out_features (for a plain dequantize: numel, with cols = 1) */
  int64_t cols;                /* K: in_features */
} QeQuant;

QE_EXPORT int qe_abi_version(void);
QE_EXPORT const char* qe_error_string(int err);
/* Initialises this library's CUDA runtime; only call once the process already uses CUDA. */
QE_EXPORT int qe_probe(int* device_count, int* runtime_version, int* driver_version);

/* out[rows*cols] (out_dtype) = dtype(code[c] * absmax[block]); bit-exact with ops.ref_dequantize_4bit. */
QE_EXPORT int qe_dequantize_4bit(const QeQuant* q, void* out, int out_dtype, int64_t stream);

/* Small M (1..16): y[m, rows] = x[m, cols] . dequant(W)^T, x/y bf16 or fp16, fp32 accumulation. */
QE_EXPORT int qe_gemv_4bit(const QeQuant* q, const void* x, int dtype, int64_t m, void* y, int64_t stream);

/* Small M (1..16): dx[m, cols] = dy[m, rows] . dequant(W). Needs a device workspace of
 * qe_gemv_4bit_t_workspace() bytes (cross-block fp32 partial sums and counters; zeroed here). */
QE_EXPORT int64_t qe_gemv_4bit_t_workspace(const QeQuant* q, int64_t m);
QE_EXPORT int qe_gemv_4bit_t(const QeQuant* q, const void* dy, int dtype, int64_t m, void* dx, void* workspace,
                             int64_t stream);

/* Any M, fused tensor-core kernels: W tiles dequantized into shared memory, never to global memory.
 * Cover cols % 32 == 0, rows % 8 == 0, 16-byte aligned pointers; else QE_ERR_UNSUPPORTED. */
QE_EXPORT int qe_gemm_4bit(const QeQuant* q, const void* x, int dtype, int64_t m, void* y, int64_t stream);
QE_EXPORT int qe_gemm_4bit_t(const QeQuant* q, const void* dy, int dtype, int64_t m, void* dx, int64_t stream);

#ifdef __cplusplus
}
#endif

#endif /* QLORA_ENGINE_H */
