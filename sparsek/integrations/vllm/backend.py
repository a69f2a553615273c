"""sparsek as a vLLM V1 attention backend: `SPARSEK` (written against vllm 0.33.0).

    pip install ".[vllm]"                # in a sparsek checkout (pins vllm==0.33.0)
    vllm serve MODEL --attention-backend SPARSEK
    LLM(model, attention_backend="SPARSEK")

The name is registered by the `vllm.general_plugins` entry point
(`sparsek.integrations.vllm.plugin:register`), which vLLM runs in every process before
it reads the backend name. This module holds the backend itself:

  * `SparseKBackend` declares what it serves (the selector refuses anything else, with
    the reasons from `validate_configuration`): decoder self-attention, causal; head
    sizes and compute capabilities with a registered sparsek kernel (32, 64, 96, 128,
    192 and 256 on 9.0);
    float16 / bfloat16 with a KV cache of the same dtype ("auto") or an FP8 E4M3 cache
    (`kv_cache_dtype="fp8"` / `"fp8_e4m3"`, head sizes with FP8-cache kernels: 64 and 128
    on 9.0); kernel block sizes that are multiples of 16; layers with a sliding window, a
    logits soft cap and attention sinks (gpt-oss has windows and sinks), alone or
    together. Not supported (refused): ALiBi, R-SWA, encoder / cross attention,
    non-causal attention, other quantized KV caches (fp8_e5m2, per-token-head scales),
    MLA, DCP/PCP, fused output quantization, batch invariance.
  * `SparseKImpl` takes a layer's mask as vLLM's FlashAttention backend reads it:
    `sliding_window` (the tokens a query sees, itself included) is the window
    (sliding_window - 1, 0), bottom-right per sequence; `logits_soft_cap` None or 0 is no
    cap, c > 0 caps scores as c * tanh(s / c); `sinks` (the model's (num_heads,) sink
    parameter, float16 / bfloat16 / float32) are read as float32, exactly, from one tensor
    refilled in place once the checkpoint is loaded (and after a weight reload). Sinks of
    another dtype or shape, a sliding window < 1 and a negative or non-finite soft cap are
    refused when vLLM builds the layer, with the reason.
  * `SparseKImpl.do_kv_cache_update` writes the step's new K/V into the paged cache
    (slots < 0 skipped; an FP8 cache gets them divided by the layer's per-tensor
    `_k_scale` / `_v_scale` and rounded to E4M3, as vLLM's own cache update writes them);
    `SparseKImpl.forward` runs every sequence of the batch
    (decodes, chunked prefills, prefills, mixed) in one `sparsek.attention_with_kvcache`
    call over vLLM's cache, read in place (an FP8 cache with the same scales as its
    descales; queries stay in the model's dtype), see `sparsek.integrations.vllm.kernels`.
  * `SparseKMetadataBuilder` passes vLLM's persistent metadata tensors through (no host
    synchronization, no allocation) and, when it is created (before the first request and
    before CUDA-graph capture), loads every kernel its layers can need: those of each
    distinct mask of the KV-cache group's layers. FULL CUDA graphs: uniform single-token
    decode batches (`UNIFORM_SINGLE_TOKEN_DECODE`), windowed layers included; other
    batches run under piecewise graphs.

KV-cache layout: vLLM's per-layer cache, logically (num_blocks, num_kv_heads, block_size,
2 * head_size), in any `KVCacheLayout` (LBNHC, vLLM's default, is token-major per block);
the kernels read K and V as strided views of it, without copies.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

import torch
from torch import Tensor

try:
    from vllm.v1.attention.backend import (
        AttentionBackend,
        AttentionCGSupport,
        AttentionImpl,
        AttentionLayer,
        AttentionMetadataBuilder,
        AttentionType,
        CommonAttentionMetadata,
        MultipleOf,
    )
except ImportError as exc:  # pragma: no cover - exercised in a subprocess test
    raise ImportError(
        "sparsek.integrations.vllm.backend needs vLLM 0.33, which is not installed "
        f"({type(exc).__name__}: {exc}); install the release it is written against: "
        "pip install vllm==0.33.0 (or, in a sparsek checkout: pip install '.[vllm]')"
    ) from exc

from sparsek import registry, tuning
from sparsek.fp8 import FP8_DTYPE
from sparsek.integrations.vllm import kernels
from sparsek.integrations.vllm.plugin import BACKEND_NAME

__all__ = ["BACKEND_NAME", "SparseKBackend", "SparseKImpl", "SparseKMetadata"]

# vLLM's names of an FP8 E4M3 KV cache with per-tensor scales.
FP8_CACHES = ("fp8", "fp8_e4m3")
# Kernel block sizes (vLLM's "block_size", the kernels' page size): multiples of this.
BLOCK_SIZE_MULTIPLE = 16


class MaskArgs(NamedTuple):
    """A layer's mask arguments, as `kernels.load_kernels` takes them."""

    window_size: tuple[int, int]
    softcap: float
    has_sinks: bool


@dataclass
class SparseKMetadata:
    """Per-step metadata shared by a layer group (views of vLLM's persistent buffers)."""

    num_actual_tokens: int
    max_query_len: int
    query_start_loc: Tensor  # (num_reqs + 1,) int32
    max_seq_len: int
    seq_lens: Tensor  # (num_reqs,) int32, cached tokens including this step's
    block_table: Tensor  # (num_reqs, max_blocks) int32
    slot_mapping: Tensor  # (num_tokens,) int64, -1 for padding


class SparseKBackend(AttentionBackend):  # type: ignore[misc]
    """vLLM attention backend running sparsek's paged-KV kernels."""

    supported_dtypes: ClassVar[list[torch.dtype]] = [torch.float16, torch.bfloat16]
    supported_kv_cache_dtypes: ClassVar[list[Any]] = ["auto", "float16", "bfloat16", *FP8_CACHES]
    # vLLM calls do_kv_cache_update before forward.
    forward_includes_kv_cache_update: bool = False

    @staticmethod
    def get_name() -> str:
        return BACKEND_NAME

    @staticmethod
    def get_impl_cls() -> type[SparseKImpl]:
        return SparseKImpl

    @staticmethod
    def get_builder_cls() -> type[SparseKMetadataBuilder]:
        return SparseKMetadataBuilder

    @staticmethod
    def get_supported_kernel_block_sizes(kv_cache_spec: Any = None) -> list[int | MultipleOf]:
        return [MultipleOf(BLOCK_SIZE_MULTIPLE)]

    @classmethod
    def supports_sliding_window(cls) -> bool:
        """Layers with a `sliding_window` (the selector's `has_sliding_window`)."""
        return True

    @classmethod
    def supports_sink(cls) -> bool:
        """Layers with attention sinks (the selector's `has_sink`)."""
        return True

    @classmethod
    def get_supported_head_sizes(cls) -> list[int]:
        arches = registry.registered_arches()
        return sorted({d for arch in arches for d in registry.registered_head_dims(arch)})

    @classmethod
    def supports_compute_capability(cls, capability: Any) -> bool:
        arch = registry.arch_from_capability((capability.major, capability.minor))
        return arch in registry.registered_arches()

    @classmethod
    def validate_configuration(cls, **config: Any) -> list[str]:
        """vLLM's checks (reasons, empty = supported), each naming the value and what is
        supported. vLLM's selector calls this with keyword arguments only."""
        reasons: list[str] = super().validate_configuration(**config)
        capability = config["device_capability"]
        supported_capabilities = ", ".join(
            f"{major}.{minor}"
            for (major, minor), arch in registry.ARCH_BY_CAPABILITY.items()
            if arch in registry.registered_arches()
        )
        detail = {
            "head_size not supported": f"head_size={config['head_size']} is not supported "
            f"(supported: {', '.join(map(str, cls.get_supported_head_sizes()))})",
            "dtype not supported": f"dtype={config['dtype']} is not supported (supported: "
            f"{', '.join(map(registry.dtype_name, cls.supported_dtypes))})",
            "kv_cache_dtype not supported": f"kv_cache_dtype={config['kv_cache_dtype']} is "
            f"not supported (supported: {', '.join(cls.supported_kv_cache_dtypes)})",
            "block_size not supported": f"block_size={config['block_size']} is not supported "
            f"(supported: multiples of {BLOCK_SIZE_MULTIPLE})",
            "compute capability not supported": "compute capability "
            f"{capability.major}.{capability.minor} is not supported "
            f"(supported: {supported_capabilities})",
            "R-SWA not supported": "R-SWA (model_config.rswa_window: a sliding window "
            "beside a fully visible prefix) is not supported (supported: sliding_window)",
        }
        return [detail.get(reason, reason) for reason in reasons]

    @classmethod
    def supports_combination(
        cls,
        head_size: int,
        dtype: torch.dtype,
        kv_cache_dtype: Any,
        block_size: int | None,
        use_mla: bool,
        has_sink: bool,
        use_sparse: bool,
        use_mm_prefix: bool,
        device_capability: Any,
    ) -> str | None:
        arch = registry.arch_from_capability((device_capability.major, device_capability.minor))
        dims = registry.registered_head_dims(arch)  # empty for an unregistered arch
        if dims and head_size not in dims:
            return f"head_size={head_size} has no sparsek kernel on {arch}: {dims}"
        cache_dtype = _cache_dtype_name(kv_cache_dtype)
        if cache_dtype in FP8_CACHES:
            fp8_dims = tuning.fp8_head_dims(arch)
            if dims and head_size not in fp8_dims:
                return (
                    f"kv_cache_dtype={kv_cache_dtype} with head_size={head_size}: sparsek's "
                    f"FP8-cache kernels on {arch} serve head sizes {fp8_dims}"
                )
            return None
        known = cache_dtype in cls.supported_kv_cache_dtypes  # else refused already
        if known and cache_dtype not in (None, registry.dtype_name(dtype)):
            return (
                f"kv_cache_dtype={kv_cache_dtype} differs from the model dtype "
                f"{registry.dtype_name(dtype)}: sparsek reads a cache of the model's dtype"
            )
        return None


def _cache_dtype_name(kv_cache_dtype: Any) -> str | None:
    """ "float16" / "bfloat16" / "fp8" ... for an explicit cache dtype; None for "auto"
    (the model's)."""
    if kv_cache_dtype in (None, "auto"):
        return None
    return str(kv_cache_dtype)


class SparseKImpl(AttentionImpl[SparseKMetadata]):  # type: ignore[misc]
    """One attention layer: cache update and forward over vLLM's paged cache.

    The layer's mask, as vLLM's FlashAttention backend reads its arguments:
    `sliding_window` (tokens a query sees, itself included) is the window
    (sliding_window - 1, 0); `logits_soft_cap` None or 0 is no cap; `sinks` (the model's
    (num_heads,) sink parameter, float16 / bfloat16 / float32) is read as float32 (see
    `refresh_sinks`).
    """

    def __init__(
        self,
        num_heads: int,
        head_size: int,
        scale: float,
        num_kv_heads: int | None = None,
        alibi_slopes: list[float] | None = None,
        sliding_window: int | None = None,
        kv_cache_dtype: str = "auto",
        logits_soft_cap: float | None = None,
        attn_type: str = AttentionType.DECODER,
        kv_sharing_target_layer_name: str | None = None,
        sinks: Tensor | None = None,
        **extra: Any,
    ) -> None:
        reasons = unsupported_layer_reasons(
            num_heads,
            alibi_slopes,
            sliding_window,
            kv_cache_dtype,
            logits_soft_cap,
            attn_type,
            sinks,
            extra,
        )
        if reasons:
            raise NotImplementedError(
                f"the {BACKEND_NAME} attention backend cannot run this layer: " + "; ".join(reasons)
            )
        self.num_heads = num_heads
        self.head_size = head_size
        self.scale = float(scale)
        self.num_kv_heads = num_kv_heads if num_kv_heads is not None else num_heads
        self.kv_cache_dtype = kv_cache_dtype
        self.fp8_cache = kv_cache_dtype in FP8_CACHES
        self.attn_type = attn_type
        self.kv_sharing_target_layer_name = kv_sharing_target_layer_name
        self.sliding_window = sliding_window
        self.window_size = kernels.window_size_of(sliding_window)
        self.logits_soft_cap = float(logits_soft_cap or 0.0)
        # The model's parameter (vLLM loads the checkpoint's values into it after the
        # layers are built) and the float32 tensor the kernels read.
        self.sinks_source = sinks
        self.sinks: Tensor | None = None
        self.refresh_sinks()

    def mask_args(self) -> MaskArgs:
        """The layer's mask as `kernels.load_kernels` takes it."""
        return MaskArgs(self.window_size, self.logits_soft_cap, self.sinks is not None)

    def refresh_sinks(self) -> None:
        """Point `sinks` at the model's sink values as float32, without reallocating.

        A contiguous float32 parameter is read in place. Any other (float16, bfloat16,
        strided) is copied into a float32 tensor made once, when the layer is built, and
        refilled in place afterwards, so CUDA graphs captured on it read the refilled
        values. float16 and bfloat16 convert to float32 exactly: the logits are those
        vLLM's FlashAttention backend hands its kernels (the parameter itself), which
        compute with them in float32. vLLM calls `process_weights_after_loading` (which
        calls this) once the checkpoint is loaded, and again after a weight reload.
        """
        source = self.sinks_source
        if source is None:
            return
        source = source.detach()
        if source.dtype == torch.float32 and source.is_contiguous():
            self.sinks = source  # read in place
            return
        if self.sinks is None or self.sinks.device != source.device:
            self.sinks = torch.empty(source.shape, dtype=torch.float32, device=source.device)
        self.sinks.copy_(source)

    def process_weights_after_loading(self, act_dtype: torch.dtype) -> None:
        """vLLM's hook after the checkpoint is loaded (and after a reload): the sinks."""
        self.refresh_sinks()

    def do_kv_cache_update(
        self,
        layer: torch.nn.Module,
        key: Tensor,
        value: Tensor,
        kv_cache: Tensor,
        slot_mapping: Tensor,
    ) -> None:
        """Write this step's keys/values into the layer's paged cache (slots < 0 skipped;
        an FP8 cache: divided by the layer's `_k_scale` / `_v_scale`, rounded)."""
        k_cache, v_cache = self.layer_caches(kv_cache)
        kernels.store_kv(key, value, k_cache, v_cache, slot_mapping, self.cache_scales(layer))

    def layer_caches(self, kv_cache: Tensor) -> tuple[Tensor, Tensor]:
        """K and V views of the layer's cache (vLLM allocates FP8 caches as uint8)."""
        if self.fp8_cache:
            kv_cache = kv_cache.view(FP8_DTYPE)
        return kernels.split_kv_cache(kv_cache, self.head_size)

    def cache_scales(self, layer: Any) -> tuple[Tensor, Tensor] | None:
        """An FP8 cache's (k_scale, v_scale): the layer's per-tensor float32 scales (vLLM
        keeps them on the device and updates them in place); None otherwise."""
        if not self.fp8_cache:
            return None
        return layer._k_scale, layer._v_scale

    def forward(
        self,
        layer: AttentionLayer,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        kv_cache: Tensor,
        attn_metadata: SparseKMetadata,
        output: Tensor,
        output_scale: Tensor | None = None,
        output_block_scale: Tensor | None = None,
    ) -> Tensor:
        """Attention of the step's queries over the cache (already updated) -> output."""
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError(
                f"the {BACKEND_NAME} attention backend does not fuse output quantization"
            )
        if attn_metadata is None:  # vLLM's memory-profiling run: no cache, no metadata
            return output.fill_(0)
        n = attn_metadata.num_actual_tokens
        k_cache, v_cache = self.layer_caches(kv_cache)
        kernels.paged_attention(
            query[:n],
            k_cache,
            v_cache,
            attn_metadata.query_start_loc,
            attn_metadata.seq_lens,
            attn_metadata.block_table,
            attn_metadata.max_query_len,
            self.scale,
            output[:n],
            window_size=self.window_size,
            softcap=self.logits_soft_cap,
            sinks=self.sinks,
            descales=self.cache_scales(layer),
        )
        return output


SINK_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def unsupported_layer_reasons(
    num_heads: int,
    alibi_slopes: list[float] | None,
    sliding_window: int | None,
    kv_cache_dtype: str,
    logits_soft_cap: float | None,
    attn_type: str,
    sinks: Tensor | None,
    extra: dict[str, Any],
) -> list[str]:
    """Why `SparseKImpl` cannot run a layer with these arguments (empty: it can)."""
    reasons = []
    if alibi_slopes is not None:
        reasons.append("alibi_slopes: ALiBi is not supported")
    try:
        kernels.window_size_of(sliding_window)
    except ValueError as exc:
        reasons.append(str(exc))
    if kv_cache_dtype not in SparseKBackend.supported_kv_cache_dtypes:
        supported = ", ".join(map(str, SparseKBackend.supported_kv_cache_dtypes))
        reasons.append(f"kv_cache_dtype={kv_cache_dtype} is not supported ({supported})")
    if logits_soft_cap is not None and (
        isinstance(logits_soft_cap, bool)
        or not isinstance(logits_soft_cap, (int, float))
        or not 0 <= logits_soft_cap < math.inf
    ):
        reasons.append(
            f"logits_soft_cap={logits_soft_cap!r} is not supported (supported: a finite "
            "number > 0, or None / 0 for no cap)"
        )
    if attn_type != AttentionType.DECODER:
        reasons.append(f"attn_type={attn_type}: only decoder self-attention is supported")
    if sinks is not None:
        reasons += sink_reasons(sinks, num_heads)
    for name, value in extra.items():
        if value is not None and value is not False:
            reasons.append(f"{name}={value!r} is not supported")
    return reasons


def sink_reasons(sinks: object, num_heads: int) -> list[str]:
    """Why the kernels cannot read `sinks` (empty: they can, as float32)."""
    if not isinstance(sinks, Tensor):
        return [f"sinks must be a tensor of shape (num_heads,), got {type(sinks).__name__}"]
    reasons = []
    if sinks.dtype not in SINK_DTYPES:
        supported = ", ".join(map(registry.dtype_name, SINK_DTYPES))
        reasons.append(
            f"sinks of dtype {sinks.dtype} are not supported (supported: {supported}, "
            "read as float32)"
        )
    if tuple(sinks.shape) != (num_heads,):
        reasons.append(
            f"sinks of shape {tuple(sinks.shape)} are not supported: one logit per query "
            f"head of the layer, (num_heads,) = ({num_heads},)"
        )
    return reasons


class SparseKMetadataBuilder(AttentionMetadataBuilder[SparseKMetadata]):  # type: ignore[misc]
    """Builds `SparseKMetadata` from vLLM's common metadata; loads kernels when created."""

    # FULL graphs for pure single-token decode batches; other batches: piecewise.
    _cudagraph_support: ClassVar[AttentionCGSupport] = (
        AttentionCGSupport.UNIFORM_SINGLE_TOKEN_DECODE
    )

    def __init__(
        self,
        kv_cache_spec: Any,
        layer_names: list[str],
        vllm_config: Any,
        device: torch.device,
    ) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        if torch.device(device).type == "cuda":
            dtype, cache_dtype = group_dtypes(kv_cache_spec, vllm_config)
            for mask in group_masks(kv_cache_spec, layer_names, vllm_config):
                kernels.load_kernels(
                    torch.device(device),
                    kv_cache_spec.head_size,
                    dtype,
                    kv_cache_spec.block_size,
                    **mask._asdict(),
                    cache_dtype=cache_dtype,
                )

    def build(
        self,
        common_prefix_len: int,
        common_attn_metadata: CommonAttentionMetadata,
        fast_build: bool = False,
    ) -> SparseKMetadata:
        cm = common_attn_metadata
        if cm.causal is not True:
            raise NotImplementedError(
                f"the {BACKEND_NAME} attention backend runs causal attention only "
                f"(got causal={cm.causal!r})"
            )
        return SparseKMetadata(
            num_actual_tokens=cm.num_actual_tokens,
            max_query_len=cm.max_query_len,
            query_start_loc=cm.query_start_loc,
            max_seq_len=cm.max_seq_len,
            seq_lens=cm.seq_lens,
            block_table=cm.block_table_tensor,
            slot_mapping=cm.slot_mapping,
        )


def group_dtypes(kv_cache_spec: Any, vllm_config: Any) -> tuple[torch.dtype, torch.dtype | None]:
    """(the queries' dtype, the cache's when it differs: float8_e4m3fn, else None) of a
    KV-cache group. vLLM's spec of an FP8 cache says uint8 (its allocation); the queries
    then have the model's dtype."""
    if kv_cache_spec.dtype != torch.uint8:
        return kv_cache_spec.dtype, None
    return vllm_config.model_config.dtype, FP8_DTYPE


def group_masks(kv_cache_spec: Any, layer_names: list[str], vllm_config: Any) -> list[MaskArgs]:
    """The distinct masks of a KV-cache group's layers (one group may mix windowed and
    global layers), read from their impls in vLLM's registry of layers (the config's
    static forward context). When it lists none of them: the group's own sliding window,
    if any, without softcap or sinks."""
    compilation = getattr(vllm_config, "compilation_config", None)
    context = getattr(compilation, "static_forward_context", {})
    masks: list[MaskArgs] = []
    for name in layer_names:
        impl = getattr(context.get(name), "impl", None)
        if isinstance(impl, SparseKImpl) and impl.mask_args() not in masks:
            masks.append(impl.mask_args())
    if not masks:
        window = kernels.window_size_of(getattr(kv_cache_spec, "sliding_window", None))
        masks.append(MaskArgs(window, 0.0, False))
    return masks
