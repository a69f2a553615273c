"""SIMT row kernels (no tensor cores, any sm_80+ architecture): the split-KV combine and
the paged KV-cache update."""
