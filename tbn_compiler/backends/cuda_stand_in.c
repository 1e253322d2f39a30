/*
 * Stand-in for the NVIDIA driver library (soname libcuda.so.1) on machines without one.
 *
 * TVM's CUDA runtime (libtvm_runtime_cuda.so) calls these nine driver entry points
 * directly, so it can neither be linked nor loaded (TVM loads with RTLD_NOW) where no
 * driver is installed. This library defines them and nothing else: every call reports
 * CUDA_ERROR_NO_DEVICE, except the two error-text queries, which describe that error so
 * a caller printing it gets a readable message. The CUDA runtime library (cudart,
 * linked statically) looks for the real driver itself and finds none here, so no GPU is
 * ever reported.
 *
 * Built and installed by tbn_compiler/backends/cuda_runtime.py only where no driver
 * exists; on a machine with a GPU the real driver is used and this file plays no part.
 */

#include <stddef.h>

typedef int CUresult;

#define CUDA_SUCCESS 0
#define CUDA_ERROR_NO_DEVICE 100

static const char kName[] = "CUDA_ERROR_NO_DEVICE";
static const char kText[] =
    "no CUDA-capable device is detected (stand-in libcuda.so.1: no NVIDIA driver here)";

CUresult cuGetErrorName(CUresult error, const char **text) {
  if (text == NULL) return CUDA_ERROR_NO_DEVICE;
  *text = error == CUDA_ERROR_NO_DEVICE ? kName : "CUDA_ERROR_UNKNOWN";
  return CUDA_SUCCESS;
}

CUresult cuGetErrorString(CUresult error, const char **text) {
  if (text == NULL) return CUDA_ERROR_NO_DEVICE;
  *text = error == CUDA_ERROR_NO_DEVICE ? kText : "unknown error (stand-in libcuda.so.1)";
  return CUDA_SUCCESS;
}

CUresult cuDeviceGetName(char *name, int len, int device) {
  (void)device;
  if (name != NULL && len > 0) name[0] = '\0';
  return CUDA_ERROR_NO_DEVICE;
}

CUresult cuFuncSetAttribute(void *function, int attribute, int value) {
  (void)function, (void)attribute, (void)value;
  return CUDA_ERROR_NO_DEVICE;
}

CUresult cuLaunchKernelEx(const void *config, void *function, void **params, void **extra) {
  (void)config, (void)function, (void)params, (void)extra;
  return CUDA_ERROR_NO_DEVICE;
}

CUresult cuModuleGetFunction(void **function, void *module, const char *name) {
  (void)module, (void)name;
  if (function != NULL) *function = NULL;
  return CUDA_ERROR_NO_DEVICE;
}

CUresult cuModuleLoadData(void **module, const void *image) {
  (void)image;
  if (module != NULL) *module = NULL;
  return CUDA_ERROR_NO_DEVICE;
}

CUresult cuModuleUnload(void *module) {
  (void)module;
  return CUDA_ERROR_NO_DEVICE;
}

CUresult cuTensorMapEncodeTiled(void *map, int dtype, unsigned rank, void *address,
                                const void *dims, const void *strides, const void *box,
                                const void *element_strides, int interleave, int swizzle,
                                int l2_promotion, int oob_fill) {
  (void)map, (void)dtype, (void)rank, (void)address, (void)dims, (void)strides, (void)box;
  (void)element_strides, (void)interleave, (void)swizzle, (void)l2_promotion, (void)oob_fill;
  return CUDA_ERROR_NO_DEVICE;
}
