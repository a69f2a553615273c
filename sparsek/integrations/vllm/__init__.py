"""sparsek as vLLM's `SPARSEK` attention backend (written against vllm 0.33.0).

- `plugin`: the `vllm.general_plugins` entry point that registers the backend's name
  (imports only vLLM's registry);
- `backend`: the backend, its implementation and metadata builder (the only module that
  imports vLLM's attention API);
- `kernels`: the calls the backend makes on vLLM's cache layout, vLLM-free (the GPU tests
  run them without vLLM).

Importing this package imports none of them.
"""
