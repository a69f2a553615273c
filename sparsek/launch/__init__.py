"""From a checked request to kernel launches on the GPU (CUDA tensors only).

- `launcher`: a request's kernel identity -> the loaded kernel (compiled or loaded from the
  disk cache on first use), the device guard, the SM count, per-call buffers;
- `tma`: which tensors the kernels can read in place (TMA's rules), copies otherwise;
- `dense`, `varlen`, `kvcache`: each entry point's plan (worked out once per request
  signature: shapes, strides, dtype, device, flags) and its run;
- `splits`: the split-KV factor of decode; `kv_store`: the paged KV-cache update.

Nothing here reads tensor values on the host (no synchronization): every path can be
captured in a CUDA graph once its kernels are loaded.
"""
