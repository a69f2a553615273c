"""Provider adapters: one object per implementation, all taking (batch, seqlen, heads, head_dim).

A provider answers three questions:
    unavailable() -> reason it cannot run in this process at all (None when it can)
    context()     -> the state to hold while it is measured (e.g. the SDPA backend choice)
    prepare(...)  -> a zero-argument callable computing one forward, returning
                     (batch, seqlen_q, heads, head_dim); raises `Unsupported` for a shape it
                     cannot serve
and, for the varlen and decode suites (`prepare_inputs` picks by the inputs' layout):
    prepare_varlen(case, VarlenInputs) -> callable returning (total, heads, head_dim)
    prepare_paged(case, PagedInputs)   -> callable returning (batch, 1, heads, head_dim)
    prepare_cache(case, CacheInputs)   -> callable returning (total_q, heads, head_dim)
                                          (xformers suite: padded / paged keys)
and, for the masks suite (window, softcap, sinks; dense or paged decode inputs):
    prepare_masks(case, DenseInputs | PagedInputs) -> callable returning what prepare /
                                          prepare_paged return
Errors raised while running are recorded by the caller as "skipped" with the message.

varlen: sparsek.attention_varlen, FA4's flash_attn_varlen_func (cu_seqlens), and the SDPA
backends through PyTorch's jagged nested tensors (`torch.nested.nested_tensor_from_jagged`
views of the packed tensors; SDPA then calls the backend's varlen kernel). decode:
sparsek.attention_with_kvcache and flash_attn_varlen_func(page_table=, seqused_k=) on the
paged cache; the SDPA backends on the same keys gathered into a dense contiguous cache.

Causal is bottom-right aligned everywhere (query i sees key j <= i + seqlen_k - seqlen_q).
PyTorch's `is_causal` is top-left, so for seqlen_q != seqlen_k the SDPA rows call the backend
ops that implement bottom-right masking directly (what `torch.nn.attention.bias.causal_lower_right`
dispatches to, but without its silent fallback from one backend to another).

`sparsek_xformers` (xformers suite only) runs sparsek through its xFormers operator,
`memory_efficient_attention_forward(q, k, v, attn_bias=<case.bias>, op=SparseKAttention)`.
It imports xFormers, so it never shares a process with `fa4` (bench_fmha.py refuses that).
Its block-diagonal rows are the same problems for the other providers: packed keys as in
varlen; padded / paged keys (chunked prefill against a cache) through
sparsek.attention_with_kvcache(cu_seqlens_q=...) on the same cache, and through SDPA on the
valid keys gathered and packed before timing (jagged nested tensors when non-causal; the
flash / efficient varlen ops called directly with bottom-right causal, cuDNN skipped, as for
causal with seqlen_q != seqlen_k). Its local (sliding-window) biases are the same problems
with the case's window: sparsek.attention / attention_varlen / attention_with_kvcache with
`window_size` = `case.window` (the bias's window in sparsek's terms); SDPA takes no window
(a dense boolean mask would time another workload), so its rows there are skipped.

masks suite: each provider's own mask arguments, passed only when the case has the mask (a
plain case makes the same call as the grid / decode suites): sparsek.attention and
attention_with_kvcache (window_size, softcap, sinks); FA4's flash_attn_func and
flash_attn_varlen_func (window_size, softcap, learnable_sink); `fa3`, FlashAttention-3's
`fa3_fwd_interface.flash_attn_func` and `flash_attn_with_kvcache` (window_size, softcap; it
has no sinks). SDPA has none of these masks (a dense boolean mask would time another
workload) and is not planned there.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import itertools
import os
from collections.abc import Callable, Iterator
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor

from perf import shapes
from perf.inputs import CacheInputs, DenseInputs, Inputs, PagedInputs, VarlenInputs
from perf.shapes import Case

AttnFn = Callable[[], Tensor]

# sparsek falls back to torch SDPA for inputs its kernels cannot serve; in strict mode it
# raises instead, so a fallback shows up as a skipped row and never as "sparsek" timings.
STRICT_ENV = "SPARSEK_STRICT"


class Unsupported(Exception):
    """The provider cannot serve this shape (recorded as skipped with this reason)."""


class Provider:
    name = ""

    def unavailable(self) -> str | None:
        return None

    def version(self) -> str:
        return ""

    def context(self) -> contextlib.AbstractContextManager[Any]:
        return contextlib.nullcontext()

    def prepare(self, case: Case, q: Tensor, k: Tensor, v: Tensor) -> AttnFn:
        raise NotImplementedError

    def prepare_varlen(self, case: Case, inputs: VarlenInputs) -> AttnFn:
        raise Unsupported(f"{self.name} has no varlen (packed sequences) entry point here")

    def prepare_paged(self, case: Case, inputs: PagedInputs) -> AttnFn:
        raise Unsupported(f"{self.name} has no paged KV cache entry point here")

    def prepare_cache(self, case: Case, inputs: CacheInputs) -> AttnFn:
        raise Unsupported(f"{self.name} has no chunked prefill (padded / paged keys) entry here")

    def prepare_masks(self, case: Case, inputs: DenseInputs | PagedInputs) -> AttnFn:
        raise Unsupported(f"{self.name} takes no window, softcap or sinks here")


def prepare_inputs(provider: Provider, case: Case, inputs: Inputs) -> AttnFn:
    """The provider's callable for `inputs`, by their layout (dense, varlen, paged, cache);
    the masks suite's cases go to `prepare_masks`."""
    if case.suite == shapes.MASKS_SUITE:
        if not isinstance(inputs, (DenseInputs, PagedInputs)):
            raise TypeError(f"masks cases are dense or paged, not {type(inputs).__name__}")
        return provider.prepare_masks(case, inputs)
    if isinstance(inputs, CacheInputs):
        return provider.prepare_cache(case, inputs)
    if isinstance(inputs, VarlenInputs):
        return provider.prepare_varlen(case, inputs)
    if isinstance(inputs, PagedInputs):
        return provider.prepare_paged(case, inputs)
    assert isinstance(inputs, DenseInputs)
    return provider.prepare(case, inputs.q, inputs.k, inputs.v)


def _import_error(module: str) -> str | None:
    try:
        importlib.import_module(module)
    except Exception as exc:
        return f"cannot import {module}: {type(exc).__name__}: {exc}"
    return None


def mask_kwargs(case: Case, sinks: Tensor | None, *, sink_name: str = "sinks") -> dict[str, Any]:
    """The case's mask as FlashAttention-style keyword arguments, only those it sets
    (window_size as a tuple of ints, softcap as a float, the sinks under `sink_name`): a
    plain case gets none, so its call is the other suites' call."""
    kwargs: dict[str, Any] = {}
    if case.window != shapes.NO_WINDOW:
        kwargs["window_size"] = (int(case.window[0]), int(case.window[1]))
    if case.softcap > 0:
        kwargs["softcap"] = float(case.softcap)
    if case.sinks:
        if sinks is None:
            raise ValueError(f"{case.label()}: the inputs carry no sinks")
        kwargs[sink_name] = sinks
    return kwargs


@contextlib.contextmanager
def _strict() -> Iterator[None]:
    previous = os.environ.get(STRICT_ENV)
    os.environ[STRICT_ENV] = "1"
    try:
        yield
    finally:
        if previous is None:
            del os.environ[STRICT_ENV]
        else:
            os.environ[STRICT_ENV] = previous


class SparsekProvider(Provider):
    name = "sparsek"

    def unavailable(self) -> str | None:
        return _import_error("sparsek")

    def context(self) -> contextlib.AbstractContextManager[Any]:
        return _strict()

    def version(self) -> str:
        import sparsek

        return str(sparsek.__version__)

    def prepare(self, case: Case, q: Tensor, k: Tensor, v: Tensor) -> AttnFn:
        """sparsek.attention; an xformers local bias's window as `window_size`."""
        import sparsek

        causal, kwargs = case.causal, mask_kwargs(case, None)

        def run() -> Tensor:
            return cast(Tensor, sparsek.attention(q, k, v, causal=causal, **kwargs))

        return run

    def prepare_varlen(self, case: Case, inputs: VarlenInputs) -> AttnFn:
        """sparsek.attention_varlen; an xformers local bias's window as `window_size`."""
        import sparsek

        q, k, v, cu, top = inputs.q, inputs.k, inputs.v, inputs.cu_seqlens, inputs.max_seqlen
        causal, kwargs = case.causal, mask_kwargs(case, None)

        def run() -> Tensor:
            out = sparsek.attention_varlen(q, k, v, cu, cu, top, top, causal=causal, **kwargs)
            return cast(Tensor, out)

        return run

    def prepare_paged(self, case: Case, inputs: PagedInputs) -> AttnFn:
        import sparsek

        q, k_cache, v_cache = inputs.q, inputs.k_cache, inputs.v_cache
        cache_seqlens, block_table = inputs.cache_seqlens, inputs.block_table
        causal = case.causal

        def run() -> Tensor:
            out = sparsek.attention_with_kvcache(
                q, k_cache, v_cache, cache_seqlens, block_table, causal=causal
            )
            return cast(Tensor, out)

        return run

    def prepare_cache(self, case: Case, inputs: CacheInputs) -> AttnFn:
        """Packed new queries against the padded (block_table None) or paged cache; an
        xformers local bias's window as `window_size`."""
        import sparsek

        q, k_cache, v_cache = inputs.q, inputs.k_cache, inputs.v_cache
        cache_seqlens, block_table = inputs.cache_seqlens, inputs.block_table
        cu_q, max_q, causal = inputs.cu_seqlens_q, inputs.max_seqlen_q, case.causal
        kwargs = mask_kwargs(case, None)

        def run() -> Tensor:
            out = sparsek.attention_with_kvcache(
                q, k_cache, v_cache, cache_seqlens, block_table,
                cu_seqlens_q=cu_q, max_seqlen_q=max_q, causal=causal, **kwargs,
            )  # fmt: skip
            return cast(Tensor, out)

        return run

    def prepare_masks(self, case: Case, inputs: DenseInputs | PagedInputs) -> AttnFn:
        """sparsek.attention (dense) or attention_with_kvcache (paged decode) with the
        case's window_size / softcap / sinks."""
        import sparsek

        causal, kwargs = case.causal, mask_kwargs(case, inputs.sinks)
        if isinstance(inputs, PagedInputs):
            q, k_cache, v_cache = inputs.q, inputs.k_cache, inputs.v_cache
            cache_seqlens, block_table = inputs.cache_seqlens, inputs.block_table

            def run_paged() -> Tensor:
                out = sparsek.attention_with_kvcache(
                    q, k_cache, v_cache, cache_seqlens, block_table, causal=causal, **kwargs
                )
                return cast(Tensor, out)

            return run_paged
        q, k, v = inputs.q, inputs.k, inputs.v

        def run() -> Tensor:
            return cast(Tensor, sparsek.attention(q, k, v, causal=causal, **kwargs))

        return run


class SparsekXformersProvider(Provider):
    """sparsek through xFormers: `memory_efficient_attention_forward(..., op=SparseKAttention)`.

    q, k, v are passed as they are (BMHK, the layout every provider gets); the case's `bias`
    names the xFormers attn_bias (causal cases of other suites map to the bottom-right mask,
    the harness's convention). Block-diagonal biases get views of the same memory in
    xFormers' layout: batch 1, sequences along M (packed q / k / v, (total, H, D) ->
    (1, total, H, D)); a padded cache (B, kv_padding, H, D) -> (1, B * kv_padding, H, D), a
    paged one (num_blocks, block_size, H, D) -> (1, num_blocks * block_size, H, D) with the
    inputs' block table in the bias. The bias is built once, on the inputs' device, before
    timing. On CPU the operator runs sparsek's float32 reference, which xFormers allows for
    float16 only: with `cpu_fp16` (the dry run) bfloat16 CPU inputs are converted to float16
    once, before anything is timed, and the output back to bfloat16. Inputs the operator
    refuses raise `Unsupported` with its own reasons.
    """

    name = shapes.XFORMERS_PROVIDER

    def __init__(self, cpu_fp16: bool = False) -> None:
        self._cpu_fp16 = cpu_fp16

    def unavailable(self) -> str | None:
        return _import_error("sparsek.integrations.xformers")

    def version(self) -> str:
        import xformers

        import sparsek

        version = f"sparsek {sparsek.__version__} xformers {xformers.__version__}"
        return version + (" (dry run: CPU float16)" if self._cpu_fp16 else "")

    def context(self) -> contextlib.AbstractContextManager[Any]:
        return _strict()

    @staticmethod
    def attn_bias(
        case: Case, device: torch.device | None = None, block_table: Tensor | None = None
    ) -> Any:
        """The xFormers attn_bias object `case.bias` names (None for "None").

        Block-diagonal biases are built from the case's lengths on `device`; the Paged...
        ones take `block_table` (batch, kv_padding / block_size) int32. Local biases get
        `case.window` back in xFormers' terms (`shapes.xformers_window` the other way): a
        band's (window_left, window_right) as they are, a causal one's window_size = left + 1.
        """
        from xformers.ops.fmha import attn_bias as ab

        name = case.bias or (shapes.BIAS_BOTTOM_RIGHT if case.causal else shapes.BIAS_NONE)
        if name == shapes.BIAS_NONE:
            return None
        bias_type = getattr(ab, name)
        keys = case.keys
        if name in shapes.LOCAL_BIASES:
            return SparsekXformersProvider._local_bias(case, bias_type, device)
        if keys == "dense":
            return bias_type()
        q_seqlen = list(case.seqlens)
        if keys == "packed":
            return bias_type.from_seqlens(q_seqlen=q_seqlen, kv_seqlen=q_seqlen, device=device)
        padded_type = (
            ab.BlockDiagonalCausalWithOffsetPaddedKeysMask
            if case.causal
            else ab.BlockDiagonalPaddedKeysMask
        )
        padded = padded_type.from_seqlens(
            q_seqlen=q_seqlen,
            kv_padding=case.kv_padding,
            kv_seqlen=list(case.kv_seqlens),
            device=device,
        )
        if keys == "padded":
            return padded
        if block_table is None:
            raise ValueError(f"bias {name} needs the cache's block table")
        return padded.make_paged(block_table, case.block_size, bias_type)

    @staticmethod
    def _local_bias(case: Case, bias_type: Any, device: torch.device | None) -> Any:
        """A local bias through xFormers' own constructors, with the case's window."""
        from xformers.ops.fmha import attn_bias as ab

        left, right = case.window
        band = case.bias in shapes.BAND_BIASES
        window_size = left + 1  # the causal ones: window (window_size - 1, 0)
        keys = case.keys
        if keys == "dense":
            return (
                bias_type(window_left=left, window_right=right) if band else bias_type(window_size)
            )
        q_seqlen = list(case.seqlens)
        if keys == "packed":
            block = ab.BlockDiagonalMask.from_seqlens(
                q_seqlen=q_seqlen, kv_seqlen=q_seqlen, device=device
            )
            if case.bias == shapes.BIAS_BLOCK_LOCAL:
                return block.make_local_attention(window_size)
            return block.make_local_attention_from_bottomright(window_size)
        if keys != "padded":
            raise ValueError(f"bias {case.bias}: no local bias reads keys from a {keys} cache")
        lengths = (q_seqlen, case.kv_padding, list(case.kv_seqlens))
        if band:
            local = bias_type.from_seqlens_local(*lengths, window_left=left, window_right=right)
        else:
            local = bias_type.from_seqlens_local(*lengths, window_size=window_size)
        # from_seqlens_local takes no device: its lengths go where the inputs are.
        return local if device is None else local.to(device)

    def prepare(self, case: Case, q: Tensor, k: Tensor, v: Tensor) -> AttnFn:
        if case.num_kv_heads != case.num_heads:
            raise Unsupported("GQA rows are not in the xformers suite (BMHK needs Hkv = H)")
        return self._prepare(self.attn_bias(case), q, k, v, batched=True)

    def prepare_varlen(self, case: Case, inputs: VarlenInputs) -> AttnFn:
        """Block-diagonal biases on packed sequences: (1, total, H, D) views."""
        if case.keys != "packed":
            raise Unsupported(f"bias {case.bias or 'None'} is not a packed block-diagonal bias")
        bias = self.attn_bias(case, inputs.q.device)
        q, k, v = (t.unsqueeze(0) for t in (inputs.q, inputs.k, inputs.v))
        return self._prepare(bias, q, k, v, batched=False)

    def prepare_cache(self, case: Case, inputs: CacheInputs) -> AttnFn:
        """Padded / paged keys: the packed queries (1, total_q, H, D) against the cache's
        slots in one row, (1, slots, H, D), views of the same memory."""
        if case.keys not in ("padded", "paged"):
            raise Unsupported(f"bias {case.bias or 'None'} does not read keys from a cache")
        bias = self.attn_bias(case, inputs.q.device, inputs.block_table)
        kv_shape = (1, -1, *inputs.k_cache.shape[2:])
        k, v = inputs.k_cache.view(kv_shape), inputs.v_cache.view(kv_shape)
        return self._prepare(bias, inputs.q.unsqueeze(0), k, v, batched=False)

    def _prepare(self, bias: Any, q: Tensor, k: Tensor, v: Tensor, *, batched: bool) -> AttnFn:
        """The operator's call on BMHK q, k, v; `batched` False: drop the batch axis of 1."""
        from xformers.ops.fmha import memory_efficient_attention_forward
        from xformers.ops.fmha.common import Inputs

        from sparsek.integrations.xformers import SparseKAttention

        out_dtype = q.dtype
        if self._cpu_fp16 and q.device.type == "cpu" and q.dtype == torch.bfloat16:
            q, k, v = (t.half() for t in (q, k, v))
        reasons = SparseKAttention.not_supported_reasons(
            Inputs(query=q, key=k, value=v, attn_bias=bias)
        )
        if reasons:
            raise Unsupported("SparseKAttention refuses this input: " + "; ".join(reasons))

        def run() -> Tensor:
            out = memory_efficient_attention_forward(q, k, v, attn_bias=bias, op=SparseKAttention)
            out = cast(Tensor, out).to(out_dtype)
            return out if batched else out[0]

        return run


class SdpaProvider(Provider):
    """torch SDPA restricted to one backend with `torch.nn.attention.sdpa_kernel`.

    SDPA takes no sliding window: the xformers suite's local biases raise `Unsupported`
    (timing a dense boolean mask would measure another workload, every key's scores).
    """

    def __init__(self, name: str, backend_name: str) -> None:
        self.name = name
        self._backend_name = backend_name

    def unavailable(self) -> str | None:
        if not torch.cuda.is_available():
            return "no CUDA device"
        return None

    def version(self) -> str:
        version = f"torch {torch.__version__}"
        cudnn = torch.backends.cudnn
        if self.name == "sdpa_cudnn" and cudnn.is_available():  # type: ignore[no-untyped-call]
            version += f" cudnn {cudnn.version()}"  # type: ignore[no-untyped-call]
        return version

    def context(self) -> contextlib.AbstractContextManager[Any]:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel(getattr(SDPBackend, self._backend_name))

    @staticmethod
    def _refuse_window(case: Case) -> None:
        if case.window != shapes.NO_WINDOW:
            raise Unsupported(
                f"torch SDPA takes no sliding window ({case.bias or 'this case'}: "
                f"{case.mask_text}); a dense boolean mask would time another workload"
            )

    def prepare(self, case: Case, q: Tensor, k: Tensor, v: Tensor) -> AttnFn:
        self._refuse_window(case)
        gqa = case.num_kv_heads != case.num_heads
        # (batch, heads, seqlen, head_dim) views of the same memory: no copies timed.
        qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
        if not case.causal or case.seqlen_q == case.seqlen_k:
            causal = case.causal

            def run() -> Tensor:
                out = F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal, enable_gqa=gqa)
                return out.transpose(1, 2)

            return run
        return self._bottom_right(case, q, k, v, qt, kt, vt)

    def prepare_varlen(self, case: Case, inputs: VarlenInputs) -> AttnFn:
        """SDPA on jagged nested tensors: views of the packed q, k, v (no copies), which SDPA
        hands to the backend's varlen kernel with cu_seqlens. A backend that refuses raises
        (PyTorch logs why on the `torch.nested._internal.sdpa` logger)."""
        self._refuse_window(case)
        offsets, lengths = inputs.cu_seqlens, case.seqlens
        qn, kn, vn = (_jagged(t, offsets, lengths) for t in (inputs.q, inputs.k, inputs.v))
        causal, gqa = case.causal, case.num_kv_heads != case.num_heads

        def run() -> Tensor:
            out = F.scaled_dot_product_attention(qn, kn, vn, is_causal=causal, enable_gqa=gqa)
            return out.transpose(1, 2).values()

        return run

    def prepare_cache(self, case: Case, inputs: CacheInputs) -> AttnFn:
        """Padded / paged keys: SDPA reads the valid keys packed (gathered before timing).

        Non-causal: jagged nested tensors with their own offsets for q and for k/v, as in
        `prepare_varlen`. Causal is bottom-right per sequence (kv_seqlen > q length), which
        jagged SDPA's `is_causal` does not promise (the efficient kernel gets top-left), so
        the backends' varlen ops are called directly as in `_bottom_right`: flash (its
        `is_causal` is bottom-right), efficient with custom_mask_type 2; cuDNN is skipped.
        """
        self._refuse_window(case)
        q, k, v = inputs.q, inputs.k, inputs.v
        cu_q, cu_k = inputs.cu_seqlens_q, inputs.cu_seqlens_k
        max_q, max_k = inputs.max_seqlen_q, inputs.max_seqlen_k
        gqa = case.num_kv_heads != case.num_heads
        if not case.causal:
            qn = _jagged(q, cu_q, case.seqlens)
            kn, vn = (_jagged(t, cu_k, case.kv_seqlens) for t in (k, v))

            def run_jagged() -> Tensor:
                out = F.scaled_dot_product_attention(qn, kn, vn, enable_gqa=gqa)
                return out.transpose(1, 2).values()

            return run_jagged
        if gqa:
            raise Unsupported("bottom-right causal with GQA is not exposed by torch SDPA")
        aten = torch.ops.aten
        if self.name == "sdpa_flash":

            def run_flash() -> Tensor:
                out = aten._flash_attention_forward(
                    q, k, v, cu_q, cu_k, max_q, max_k, 0.0, True, False
                )[0]
                return cast(Tensor, out)

            return run_flash
        if self.name == "sdpa_efficient":
            q4, k4, v4 = q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0)

            def run_efficient() -> Tensor:
                out = aten._efficient_attention_forward(
                    q4, k4, v4, None, cu_q, cu_k, max_q, max_k, 0.0, 2, False
                )[0]
                return cast(Tensor, out[0])

            return run_efficient
        raise Unsupported(
            "torch SDPA has no bottom-right causal mask for cuDNN (a dense mask would time "
            "another workload)"
        )

    def prepare_paged(self, case: Case, inputs: PagedInputs) -> AttnFn:
        """SDPA on the dense copy of the cache (gathered before timing). One query at the end
        of its context sees every key, so the bottom-right causal mask is no mask
        (`is_causal=False`: PyTorch's causal is top-left and would hide all keys but one)."""
        if case.seqlen_q != 1:
            raise Unsupported("dense SDPA stands in for the paged cache only for one query")
        qt = inputs.q.transpose(1, 2)  # (batch, heads, 1, head_dim)
        k, v = inputs.k, inputs.v  # (batch, kv_heads, context, head_dim), contiguous
        gqa = case.num_kv_heads != case.num_heads

        def run() -> Tensor:
            return F.scaled_dot_product_attention(qt, k, v, enable_gqa=gqa).transpose(1, 2)

        return run

    def _bottom_right(
        self, case: Case, q: Tensor, k: Tensor, v: Tensor, qt: Tensor, kt: Tensor, vt: Tensor
    ) -> AttnFn:
        if case.num_kv_heads != case.num_heads:
            raise Unsupported("bottom-right causal with GQA is not exposed by torch SDPA")
        aten = torch.ops.aten
        if self.name == "sdpa_flash":
            # The flash op's is_causal is bottom-right aligned when seqlen_q != seqlen_k.
            def run_flash() -> Tensor:
                out = aten._scaled_dot_product_flash_attention(qt, kt, vt, 0.0, True)[0]
                return cast(Tensor, out.transpose(1, 2))

            return run_flash
        if self.name == "sdpa_efficient":
            # custom_mask_type 2 = causal from the bottom right; takes (batch, seq, heads, dim).
            def run_efficient() -> Tensor:
                out = aten._efficient_attention_forward(
                    q, k, v, None, None, None, None, None, 0.0, 2, False
                )[0]
                return cast(Tensor, out)

            return run_efficient
        raise Unsupported(
            "torch SDPA has no bottom-right causal mask for cuDNN (a dense mask would time "
            "another workload)"
        )


def _jagged(t: Tensor, offsets: Tensor, lengths: tuple[int, ...]) -> Tensor:
    """A packed (total, heads, head_dim) tensor as a jagged nested (batch, heads, ragged,
    head_dim) view. Passing the length bounds spares SDPA a device-to-host read per call."""
    nested = torch.nested.nested_tensor_from_jagged(
        t, offsets.to(torch.int64), min_seqlen=min(lengths), max_seqlen=max(lengths)
    )
    return nested.transpose(1, 2)


_FA4_MODULE = "flash_attn.cute.interface"


def _fa4() -> Any:
    """FA4's interface module (imported by name: it is untyped and absent on most machines)."""
    return importlib.import_module(_FA4_MODULE)


class Fa4Provider(Provider):
    """FlashAttention-4: `flash_attn_func`; for varlen and the paged cache
    `flash_attn_varlen_func` (cu_seqlens_q/k; page_table + seqused_k with a 4-D q).

    FA4 4.0.0b36 pages through TMA only when a page holds whole key tiles (page_size ==
    tile_n, 128 at d128) and through cp.async otherwise (16 and 64 here); split-KV is not
    available on sm_90, so num_splits stays 1 (its default) everywhere.
    """

    name = "fa4"

    def unavailable(self) -> str | None:
        return _import_error(_FA4_MODULE)

    def version(self) -> str:
        for dist in ("flash_attn_4", "flash-attn-4", "fa4"):
            try:
                return importlib.metadata.version(dist)
            except importlib.metadata.PackageNotFoundError:
                continue
        return ""

    def prepare(self, case: Case, q: Tensor, k: Tensor, v: Tensor) -> AttnFn:
        flash_attn_func = _fa4().flash_attn_func
        causal = case.causal

        def run() -> Tensor:
            # Returns (out, lse); out is (batch, seqlen_q, heads, head_dim).
            return cast(Tensor, flash_attn_func(q, k, v, causal=causal)[0])

        return run

    def prepare_varlen(self, case: Case, inputs: VarlenInputs) -> AttnFn:
        varlen_func = _fa4().flash_attn_varlen_func
        q, k, v, cu, top = inputs.q, inputs.k, inputs.v, inputs.cu_seqlens, inputs.max_seqlen
        causal = case.causal

        def run() -> Tensor:
            out = varlen_func(
                q,
                k,
                v,
                cu_seqlens_q=cu,
                cu_seqlens_k=cu,
                max_seqlen_q=top,
                max_seqlen_k=top,
                causal=causal,
            )
            return cast(Tensor, out[0])  # (out, lse); out is (total, heads, head_dim)

        return run

    def prepare_paged(self, case: Case, inputs: PagedInputs) -> AttnFn:
        varlen_func = _fa4().flash_attn_varlen_func
        q, k_cache, v_cache = inputs.q, inputs.k_cache, inputs.v_cache
        cache_seqlens, block_table = inputs.cache_seqlens, inputs.block_table
        causal = case.causal

        def run() -> Tensor:
            # 4-D q (batch, 1, heads, head_dim), K/V (num_pages, page_size, kv_heads,
            # head_dim); seqused_k counts each sequence's valid keys, max_seqlen_k defaults
            # to the page table's row (max_blocks * page_size).
            out = varlen_func(
                q,
                k_cache,
                v_cache,
                seqused_k=cache_seqlens,
                page_table=block_table,
                causal=causal,
            )
            return cast(Tensor, out[0])

        return run

    def prepare_masks(self, case: Case, inputs: DenseInputs | PagedInputs) -> AttnFn:
        """flash_attn_func (dense) or flash_attn_varlen_func with page_table (decode), with
        the case's window_size / softcap and its sinks as `learnable_sink`."""
        fa4 = _fa4()
        causal = case.causal
        kwargs = mask_kwargs(case, inputs.sinks, sink_name="learnable_sink")
        if isinstance(inputs, PagedInputs):
            varlen_func = fa4.flash_attn_varlen_func
            q, k_cache, v_cache = inputs.q, inputs.k_cache, inputs.v_cache
            cache_seqlens, block_table = inputs.cache_seqlens, inputs.block_table

            def run_paged() -> Tensor:
                out = varlen_func(
                    q, k_cache, v_cache, seqused_k=cache_seqlens, page_table=block_table,
                    causal=causal, **kwargs,
                )  # fmt: skip
                return cast(Tensor, out[0])

            return run_paged
        flash_attn_func = fa4.flash_attn_func
        q, k, v = inputs.q, inputs.k, inputs.v

        def run() -> Tensor:
            return cast(Tensor, flash_attn_func(q, k, v, causal=causal, **kwargs)[0])

        return run


_FA3_MODULE = "fa3_fwd_interface"


class Fa3Provider(Provider):
    """FlashAttention-3's forward (the `fa3_fwd` package: `fa3_fwd_interface`), in the
    masks and head_dims suites: `flash_attn_func(q, k, v, causal=)` for the head_dims
    grid (V may be narrower: 192 / 128), `flash_attn_func(q, k, v, causal=, window_size=,
    softcap=)` for the masks suite's dense inputs,
    `flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=, page_table=, causal=,
    window_size=, softcap=)` for the paged cache. Both return the output alone. It has no
    sink logits: sinks rows are skipped. A build without a feature (a fa3_fwd wheel may be
    built without local attention or the paged KV cache) raises, and the row is skipped with
    its message."""

    name = shapes.FA3_PROVIDER

    def unavailable(self) -> str | None:
        return _import_error(_FA3_MODULE)

    def version(self) -> str:
        for dist in ("fa3_fwd", "fa3-fwd"):
            try:
                return importlib.metadata.version(dist)
            except importlib.metadata.PackageNotFoundError:
                continue
        return ""

    def prepare(self, case: Case, q: Tensor, k: Tensor, v: Tensor) -> AttnFn:
        flash_attn_func = importlib.import_module(_FA3_MODULE).flash_attn_func
        causal = case.causal

        def run() -> Tensor:
            return cast(Tensor, flash_attn_func(q, k, v, causal=causal))

        return run

    def prepare_masks(self, case: Case, inputs: DenseInputs | PagedInputs) -> AttnFn:
        if case.sinks:
            raise Unsupported("FlashAttention-3 (fa3_fwd_interface) takes no sink logits")
        fa3 = importlib.import_module(_FA3_MODULE)
        causal, kwargs = case.causal, mask_kwargs(case, None)
        if isinstance(inputs, PagedInputs):
            kvcache_func = fa3.flash_attn_with_kvcache
            q, k_cache, v_cache = inputs.q, inputs.k_cache, inputs.v_cache
            cache_seqlens, block_table = inputs.cache_seqlens, inputs.block_table

            def run_paged() -> Tensor:
                out = kvcache_func(
                    q, k_cache, v_cache, cache_seqlens=cache_seqlens, page_table=block_table,
                    causal=causal, **kwargs,
                )  # fmt: skip
                return cast(Tensor, out)

            return run_paged
        flash_attn_func = fa3.flash_attn_func
        q, k, v = inputs.q, inputs.k, inputs.v

        def run() -> Tensor:
            return cast(Tensor, flash_attn_func(q, k, v, causal=causal, **kwargs))

        return run


def real_providers() -> dict[str, Provider]:
    return {
        "sparsek": SparsekProvider(),
        "sdpa_flash": SdpaProvider("sdpa_flash", "FLASH_ATTENTION"),
        "sdpa_cudnn": SdpaProvider("sdpa_cudnn", "CUDNN_ATTENTION"),
        "sdpa_efficient": SdpaProvider("sdpa_efficient", "EFFICIENT_ATTENTION"),
        "fa4": Fa4Provider(),
        shapes.XFORMERS_PROVIDER: SparsekXformersProvider(),
        shapes.FA3_PROVIDER: Fa3Provider(),
    }


# ---------------------------------------------------------------------------- dry run


class FakeProvider(Provider):
    """CPU stand-in for `--dry-run`: plain attention in the input dtype.

    `mode` exercises the report's paths: "ok" computes correctly, "wrong" perturbs the output
    (check = FAIL, still timed), "error" raises (skipped with a reason).
    """

    def __init__(self, name: str, mode: str = "ok") -> None:
        self.name = name
        self._mode = mode

    def version(self) -> str:
        return f"fake-{self._mode}"

    def _refuse(self) -> None:
        if self._mode == "error":
            raise Unsupported("fake provider refuses every shape (dry run)")

    def _attention(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        causal: bool,
        *,
        window: tuple[int, int] = shapes.NO_WINDOW,
        softcap: float = 0.0,
        sinks: Tensor | None = None,
    ) -> Tensor:
        """Attention of (batch, seqlen, heads, head_dim) tensors, bottom-right causal; the
        window (a band of diagonals: the masks suite's, the xformers local biases'), softcap
        and sinks (an extra softmax
        column per head, dropped after the softmax) written out here again, apart from
        sparsek's reference that the dry run checks them against."""
        seqlen_q, seqlen_k = q.shape[1], k.shape[1]
        group = q.shape[2] // k.shape[2]
        # Scores and the PV product accumulate in float32 as the kernels' do; P is rounded
        # to the input dtype first, as theirs is.
        qt = q.transpose(1, 2).float()
        kt = k.transpose(1, 2).repeat_interleave(group, dim=1).float()
        vt = v.transpose(1, 2).repeat_interleave(group, dim=1).float()
        scores = torch.matmul(qt, kt.transpose(2, 3)) * q.shape[-1] ** -0.5
        if softcap > 0:
            scores = softcap * torch.tanh(scores / softcap)
        offset = seqlen_k - seqlen_q
        left, right = window
        right = 0 if causal else right
        ones = torch.ones(seqlen_q, seqlen_k, dtype=torch.bool, device=q.device)
        visible = ones
        if right >= 0:
            visible = visible & ones.tril(offset + right)
        if left >= 0:
            visible = visible & ones.triu(offset - left)
        scores = scores.masked_fill(~visible, float("-inf"))
        if sinks is not None:
            sink = sinks.float().view(1, -1, 1, 1).expand(*scores.shape[:3], 1)
            probs = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :-1]
        else:
            probs = torch.softmax(scores, dim=-1)
        out = torch.matmul(probs.to(q.dtype).float(), vt)
        bias = 0.1 if self._mode == "wrong" else 0.0
        return (out + bias).to(q.dtype).transpose(1, 2)

    def prepare(self, case: Case, q: Tensor, k: Tensor, v: Tensor) -> AttnFn:
        self._refuse()
        return lambda: self._attention(q, k, v, case.causal, window=case.window)

    def prepare_varlen(self, case: Case, inputs: VarlenInputs) -> AttnFn:
        self._refuse()
        bounds = inputs.cu_seqlens.tolist()
        spans = [(a, b) for a, b in itertools.pairwise(bounds) if b > a]
        q, k, v = inputs.q, inputs.k, inputs.v

        def run() -> Tensor:
            out = torch.zeros_like(q)
            for a, b in spans:
                qs, ks, vs = q[None, a:b], k[None, a:b], v[None, a:b]
                out[a:b] = self._attention(qs, ks, vs, case.causal, window=case.window)[0]
            return out

        return run

    def prepare_paged(self, case: Case, inputs: PagedInputs) -> AttnFn:
        self._refuse()
        q, k, v = inputs.q, inputs.k.transpose(1, 2), inputs.v.transpose(1, 2)
        return lambda: self._attention(q, k, v, case.causal)

    def prepare_cache(self, case: Case, inputs: CacheInputs) -> AttnFn:
        self._refuse()
        spans = list(
            zip(
                itertools.pairwise(inputs.cu_seqlens_q.tolist()),
                itertools.pairwise(inputs.cu_seqlens_k.tolist()),
                strict=True,
            )
        )
        q, k, v = inputs.q, inputs.k, inputs.v

        def run() -> Tensor:
            out = torch.zeros_like(q)
            for (a, b), (c, d) in spans:
                if b > a and d > c:
                    qs, ks, vs = q[None, a:b], k[None, c:d], v[None, c:d]
                    seq = self._attention(qs, ks, vs, case.causal, window=case.window)
                    out[a:b] = seq[0]
            return out

        return run

    def prepare_masks(self, case: Case, inputs: DenseInputs | PagedInputs) -> AttnFn:
        self._refuse()
        q, sinks = inputs.q, inputs.sinks if case.sinks else None
        if isinstance(inputs, PagedInputs):
            k, v = inputs.k.transpose(1, 2), inputs.v.transpose(1, 2)
        else:
            k, v = inputs.k, inputs.v
        causal, window, softcap = case.causal, case.window, case.softcap
        return lambda: self._attention(q, k, v, causal, window=window, softcap=softcap, sinks=sinks)


def fake_providers() -> dict[str, Provider]:
    """Fakes named like the real providers, so the dry run walks the real report code."""
    return {
        "sparsek": FakeProvider("sparsek"),
        "sdpa_flash": FakeProvider("sdpa_flash"),
        "sdpa_cudnn": FakeProvider("sdpa_cudnn"),
        "sdpa_efficient": FakeProvider("sdpa_efficient", mode="wrong"),
        "fa4": FakeProvider("fa4", mode="error"),
        # The real operator: on CPU it runs sparsek's float32 reference through xFormers'
        # dispatch (xFormers takes float16 only there, so bf16 inputs are converted first).
        shapes.XFORMERS_PROVIDER: SparsekXformersProvider(cpu_fp16=True),
        # A second fake that computes (the masks suite's peers: fa4 refuses).
        shapes.FA3_PROVIDER: FakeProvider(shapes.FA3_PROVIDER),
    }


@contextlib.contextmanager
def measuring(provider: Provider) -> Iterator[None]:
    """Hold the provider's context without gradients for everything measured under it."""
    with provider.context(), torch.no_grad():
        yield
