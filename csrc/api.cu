/* Library-level entry points: ABI version, error strings and a probe of the CUDA runtime.
 *
 * No kernels here. qe_probe is the first call that initialises this library's (statically linked)
 * CUDA runtime; quant/cuda.py calls it only when a CUDA tensor reaches a kernel wrapper, so importing
 * qlora_engine never touches CUDA.
 */
#include "common.h"

extern "C" {

QE_EXPORT int qe_abi_version(void) { return QE_ABI_VERSION; }

QE_EXPORT const char* qe_error_string(int err) {
  if (err == QE_OK) return "ok";
  if (err == QE_ERR_UNSUPPORTED) return "inputs not covered by this kernel";
  if (err == QE_ERR_ARG) return "inconsistent arguments";
  return cudaGetErrorString(static_cast<cudaError_t>(err));
}

QE_EXPORT int qe_probe(int* device_count, int* runtime_version, int* driver_version) {
  int n = 0, rv = 0, dv = 0;
  cudaRuntimeGetVersion(&rv);
  cudaDriverGetVersion(&dv);
  cudaError_t e = cudaGetDeviceCount(&n);
  if (device_count) *device_count = n;
  if (runtime_version) *runtime_version = rv;
  if (driver_version) *driver_version = dv;
  return static_cast<int>(e);
}

}  // extern "C"
