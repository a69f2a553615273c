"""A value head dim below the query's, (192, 128) (DeepSeek-style MLA prefill), through the
registry and every launch path, with the device and the kernels faked (tests/fake_launch.py):
the kernel each path loads is the d192v128 one, and what it is handed is sized by V's head
dim (out, split partials, the combine). Numerics run on the GPU (tests/gpu)."""

from __future__ import annotations

import pytest
import torch
from fake_launch import fake_launch_path

from cutedsl_kernels.config import CAUSAL, CombineConfig, FmhaFwdConfig
from sparsek import masks, registry
from sparsek.errors import UnsupportedError
from sparsek.launch import dense, kvcache, launcher, varlen
from sparsek.tuning import Workload

D, DV = 192, 128


@pytest.fixture
def loads(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """The configs of every kernel the launch paths load (the real registry's answers)."""
    seen: list[object] = []

    def lookup(*args, **kwargs):
        config = registry.lookup(*args, **kwargs)
        seen.append(config)
        return config

    def kernel_config(q, v, mask, layout, workload=Workload.DEFAULT):  # CPU tensors
        dims = (q.shape[-1], registry.dtype_name(q.dtype), mask, layout, workload)
        return registry.find("sm_90a", *dims, v.shape[-1])

    def lookup_combine(arch, head_dim, dtype, sinks):
        seen.append(CombineConfig(arch, head_dim, registry.dtype_name(dtype), sinks))
        return seen[-1]

    fake_launch_path(monkeypatch, lookup, lambda *args: None)
    monkeypatch.setattr(launcher, "kernel_config", kernel_config)
    monkeypatch.setattr(launcher, "lookup_combine", lookup_combine)
    return seen


def rand(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, dtype=torch.bfloat16)


def test_the_registry_serves_192_with_128_and_names_what_it_does_not() -> None:
    config = registry.lookup("sm_90a", D, torch.bfloat16, CAUSAL, head_dim_v=DV)
    assert (config.head_dim, config.value_head_dim, config.name) == (
        D, DV, "fmha_fwd_sm_90a_d192v128_bfloat16_causal_m128n128s2_ov_pp",
    )  # fmt: skip
    assert registry.lookup("sm_90a", D, "bfloat16", CAUSAL, head_dim_v=D).head_dim_v is None
    with pytest.raises(UnsupportedError) as info:
        registry.lookup("sm_90a", 128, "bfloat16", CAUSAL, head_dim_v=64)
    assert (
        "head_dim_v=64 is not supported with head_dim=128 on sm_90a (supported: 128)"
        in (info.value.reasons[0])
    )
    kernels = registry.registered_kernels("sm_90a")
    mla = [k for k in kernels if isinstance(k, FmhaFwdConfig) and k.head_dim_v == DV]
    assert {k.kv_layout for k in mla} == {"dense", "varlen", "cache", "paged"}


def test_dense_launch_hands_the_kernel_a_128_wide_output(loads: list[object]) -> None:
    q, k, v = rand(2, 300, 4, D), rand(2, 300, 2, D), rand(2, 300, 2, DV)
    out, lse = dense.attention(q, k, v, True, D**-0.5, False)
    assert out.shape == (2, 300, 4, DV) and lse.shape == (2, 4, 300)
    [config] = loads
    assert isinstance(config, FmhaFwdConfig) and (config.head_dim, config.head_dim_v) == (D, DV)


def test_varlen_launch_hands_the_kernel_a_128_wide_output(loads: list[object]) -> None:
    cu = torch.tensor([0, 100, 250], dtype=torch.int32)
    q, k, v = rand(250, 4, D), rand(250, 2, D), rand(250, 2, DV)
    out, lse = varlen.attention_varlen(q, k, v, cu, cu, 150, masks.CAUSAL, D**-0.5)
    assert out.shape == (250, 4, DV) and lse.shape == (4, 250)
    [config] = loads
    assert isinstance(config, FmhaFwdConfig) and config.head_dim_v == DV and config.varlen_q


@pytest.mark.parametrize("num_splits", [1, 4])
def test_cache_decode_sizes_partials_and_combine_by_v(loads: list[object], num_splits) -> None:
    batch, pages, page = 3, 64, 16
    k_cache = rand(batch * pages, page, 2, D)
    v_cache = rand(batch * pages, page, 2, DV)
    table = torch.arange(batch * pages, dtype=torch.int32).view(batch, pages)
    seqlens = torch.tensor([1000, 1, 513], dtype=torch.int32)
    q = rand(batch, 1, 8, D)
    args = (q, k_cache, v_cache, seqlens, table, None, None, masks.NO_MASK, D**-0.5, num_splits)
    out, lse = kvcache.attention_with_kvcache(*args)
    assert out.shape == (batch, 1, 8, DV) and lse.shape == (batch, 8, 1)
    forward = [c for c in loads if isinstance(c, FmhaFwdConfig)]
    assert forward and all((c.head_dim, c.head_dim_v) == (D, DV) for c in forward)
    assert forward[-1].split_kv == (num_splits > 1)
    combine = [c for c in loads if isinstance(c, CombineConfig)]
    assert [c.head_dim for c in combine] == ([DV] if num_splits > 1 else [])
