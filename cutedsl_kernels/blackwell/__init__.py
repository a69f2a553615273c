"""Blackwell (sm_100a) kernels: none yet. A kernel added here registers in `build.py`'s
architecture table and shares `common/` with the Hopper kernels."""
