"""vLLM plugin entry point: registers sparsek's attention backend under the name SPARSEK.

pyproject.toml declares it in the `vllm.general_plugins` group, so vLLM calls `register()`
in every process (engine, workers, CLI) before it resolves `--attention-backend SPARSEK`.
It imports only vLLM's backend registry: the backend module (and torch kernels) load when
vLLM first asks for the class.

The member `AttentionBackendEnum.SPARSEK` exists only in processes that ran `register()`.
vLLM hands its config (which holds the member) to engine and worker processes; started
with "spawn" (vLLM's choice once CUDA is initialized in the parent), a child unpickles it
before it loads any plugin, and a plain enum member would not resolve there. The member
therefore pickles as a call to `backend_member()`, which registers it first.
"""

from __future__ import annotations

from typing import Any

BACKEND_NAME = "SPARSEK"
BACKEND_CLASS = "sparsek.integrations.vllm.backend.SparseKBackend"


def register() -> None:
    """Register (or re-point) `AttentionBackendEnum.SPARSEK`; safe to call repeatedly."""
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    if BACKEND_NAME in AttentionBackendEnum.__members__:
        register_backend(AttentionBackendEnum[BACKEND_NAME], BACKEND_CLASS)
    else:
        register_backend(BACKEND_NAME, BACKEND_CLASS)
    member = AttentionBackendEnum[BACKEND_NAME]
    # Instance attribute: pickle looks `__reduce_ex__` up on the object.
    member.__reduce_ex__ = _reduce_member


def backend_member() -> Any:
    """`AttentionBackendEnum.SPARSEK`, registered first if this process has not yet."""
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    if BACKEND_NAME not in AttentionBackendEnum.__members__:
        register()
    return AttentionBackendEnum[BACKEND_NAME]


def _reduce_member(protocol: int) -> tuple[Any, tuple[()]]:
    return backend_member, ()
