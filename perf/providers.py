"""Provider adapters: one object per implementation, all taking (batch, seqlen, heads, head_dim).

A provider answers three questions:
    unavailable() -> reason it cannot run in this process at all (None when it can)
    context()     -> the state to hold while it is measured (e.g. the SDPA backend choice)
    prepare(...)  -> a zero-argument callable computing one forward, returning
                     (batch, seqlen_q, heads, head_dim); raises `Unsupported` for a shape it
                     cannot serve
Errors raised while running are recorded by the caller as "skipped" with the message.

Causal is bottom-right aligned everywhere (query i sees key j <= i + seqlen_k - seqlen_q).
PyTorch's `is_causal` is top-left, so for seqlen_q != seqlen_k the SDPA rows call the backend
ops that implement bottom-right masking directly (what `torch.nn.attention.bias.causal_lower_right`
dispatches to, but without its silent fallback from one backend to another).

`sparsek_xformers` (xformers suite only) runs sparsek through its xFormers operator,
`memory_efficient_attention_forward(q, k, v, attn_bias=<case.bias>, op=SparseKAttention)`.
It imports xFormers, so it never shares a process with `fa4` (bench_fmha.py refuses that).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import os
from collections.abc import Callable, Iterator
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor

from perf import shapes
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


def _import_error(module: str) -> str | None:
    try:
        importlib.import_module(module)
    except Exception as exc:
        return f"cannot import {module}: {type(exc).__name__}: {exc}"
    return None


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
        import sparsek

        causal = case.causal

        def run() -> Tensor:
            return cast(Tensor, sparsek.attention(q, k, v, causal=causal))

        return run


class SparsekXformersProvider(Provider):
    """sparsek through xFormers: `memory_efficient_attention_forward(..., op=SparseKAttention)`.

    q, k, v are passed as they are (BMHK, the layout every provider gets); the case's `bias`
    names the xFormers attn_bias (causal cases of other suites map to the bottom-right mask,
    the harness's convention). On CPU the operator runs sparsek's float32 reference, which
    xFormers allows for float16 only: with `cpu_fp16` (the dry run) bfloat16 CPU inputs are
    converted to float16 once, before anything is timed, and the output back to bfloat16.
    Inputs the operator refuses raise `Unsupported` with its own reasons.
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
    def attn_bias(case: Case) -> Any:
        from xformers.ops.fmha import attn_bias

        name = case.bias or (shapes.BIAS_BOTTOM_RIGHT if case.causal else shapes.BIAS_NONE)
        if name == shapes.BIAS_NONE:
            return None
        return getattr(attn_bias, name)()

    def prepare(self, case: Case, q: Tensor, k: Tensor, v: Tensor) -> AttnFn:
        from xformers.ops.fmha import memory_efficient_attention_forward
        from xformers.ops.fmha.common import Inputs

        from sparsek.integrations.xformers import SparseKAttention

        if case.num_kv_heads != case.num_heads:
            raise Unsupported("GQA rows are not in the xformers suite (BMHK needs Hkv = H)")
        bias = self.attn_bias(case)
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
            return cast(Tensor, out).to(out_dtype)

        return run


class SdpaProvider(Provider):
    """torch SDPA restricted to one backend with `torch.nn.attention.sdpa_kernel`."""

    def __init__(self, name: str, backend_name: str) -> None:
        self.name = name
        self._backend_name = backend_name

    def unavailable(self) -> str | None:
        if not torch.cuda.is_available():
            return "no CUDA device"
        return None

    def version(self) -> str:
        version = f"torch {torch.__version__}"
        if self.name == "sdpa_cudnn" and torch.backends.cudnn.is_available():
            version += f" cudnn {torch.backends.cudnn.version()}"
        return version

    def context(self) -> contextlib.AbstractContextManager[Any]:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel(getattr(SDPBackend, self._backend_name))

    def prepare(self, case: Case, q: Tensor, k: Tensor, v: Tensor) -> AttnFn:
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

    def _bottom_right(
        self, case: Case, q: Tensor, k: Tensor, v: Tensor, qt: Tensor, kt: Tensor, vt: Tensor
    ) -> AttnFn:
        if case.num_kv_heads != case.num_heads:
            raise Unsupported("bottom-right causal with GQA is not exposed by torch SDPA")
        aten = torch.ops.aten
        if self.name == "sdpa_flash":
            # The flash op's is_causal is bottom-right aligned when seqlen_q != seqlen_k.
            def run_flash() -> Tensor:
                return aten._scaled_dot_product_flash_attention(qt, kt, vt, 0.0, True)[0].transpose(
                    1, 2
                )

            return run_flash
        if self.name == "sdpa_efficient":
            # custom_mask_type 2 = causal from the bottom right; takes (batch, seq, heads, dim).
            def run_efficient() -> Tensor:
                return aten._efficient_attention_forward(
                    q, k, v, None, None, None, None, None, 0.0, 2, False
                )[0]

            return run_efficient
        raise Unsupported(
            "torch SDPA has no bottom-right causal mask for cuDNN (a dense mask would time "
            "another workload)"
        )


class Fa4Provider(Provider):
    name = "fa4"

    def unavailable(self) -> str | None:
        return _import_error("flash_attn.cute.interface")

    def version(self) -> str:
        for dist in ("flash_attn_4", "flash-attn-4", "fa4"):
            try:
                return importlib.metadata.version(dist)
            except importlib.metadata.PackageNotFoundError:
                continue
        return ""

    def prepare(self, case: Case, q: Tensor, k: Tensor, v: Tensor) -> AttnFn:
        from flash_attn.cute.interface import flash_attn_func

        causal = case.causal

        def run() -> Tensor:
            # Returns (out, lse); out is (batch, seqlen_q, heads, head_dim).
            return flash_attn_func(q, k, v, causal=causal)[0]

        return run


def real_providers() -> dict[str, Provider]:
    return {
        "sparsek": SparsekProvider(),
        "sdpa_flash": SdpaProvider("sdpa_flash", "FLASH_ATTENTION"),
        "sdpa_cudnn": SdpaProvider("sdpa_cudnn", "CUDNN_ATTENTION"),
        "sdpa_efficient": SdpaProvider("sdpa_efficient", "EFFICIENT_ATTENTION"),
        "fa4": Fa4Provider(),
        shapes.XFORMERS_PROVIDER: SparsekXformersProvider(),
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

    def prepare(self, case: Case, q: Tensor, k: Tensor, v: Tensor) -> AttnFn:
        if self._mode == "error":
            raise Unsupported("fake provider refuses every shape (dry run)")
        group = case.num_heads // case.num_kv_heads
        offset = case.seqlen_k - case.seqlen_q
        scale = case.head_dim**-0.5
        visible = torch.ones(case.seqlen_q, case.seqlen_k, dtype=torch.bool).tril(offset)
        bias = 0.1 if self._mode == "wrong" else 0.0

        def run() -> Tensor:
            qt = q.transpose(1, 2)
            kt = k.transpose(1, 2).repeat_interleave(group, dim=1)
            vt = v.transpose(1, 2).repeat_interleave(group, dim=1)
            scores = torch.matmul(qt, kt.transpose(2, 3)) * scale
            if case.causal:
                scores = scores.masked_fill(~visible, float("-inf"))
            probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
            return (torch.matmul(probs, vt) + bias).transpose(1, 2)

        return run


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
    }


@contextlib.contextmanager
def measuring(provider: Provider) -> Iterator[None]:
    """Hold the provider's context without gradients for everything measured under it."""
    with provider.context(), torch.no_grad():
        yield
