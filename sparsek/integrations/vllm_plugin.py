"""vLLM plugin entry point: registers sparsek's attention backend under the name SPARSEK.

pyproject.toml declares it in the `vllm.general_plugins` group, so vLLM calls `register()`
in every process (engine, workers, CLI) before it resolves `--attention-backend SPARSEK`.
It imports only vLLM's backend registry: the backend module (and torch kernels) load when
vLLM first asks for the class.
"""

from __future__ import annotations

BACKEND_NAME = "SPARSEK"
BACKEND_CLASS = "sparsek.integrations.vllm.SparseKBackend"


def register() -> None:
    """Register (or re-point) `AttentionBackendEnum.SPARSEK`; safe to call repeatedly."""
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    if BACKEND_NAME in AttentionBackendEnum.__members__:
        register_backend(AttentionBackendEnum[BACKEND_NAME], BACKEND_CLASS)
    else:
        register_backend(BACKEND_NAME, BACKEND_CLASS)
