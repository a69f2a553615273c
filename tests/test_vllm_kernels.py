"""`sparsek.integrations.vllm.kernels` on CPU (no vLLM needed): the vLLM backend's calls.

Compared against: the cache written by plain Python indexing, token by token (store_kv),
and float64 attention computed here per sequence from the dense K/V generated before they
were written (paged_attention through sparsek's CPU reference path; with a window, softcap
and sinks: `sparsek.reference_varlen.reference_attention_kvcache` in float64 over the
dense K/V). The cache is a view of one buffer in vLLM 0.33's layouts (logical
(num_blocks, num_kv_heads, block_size, 2D), physical LBNHC or LBHNC, beside another
layer), so K/V are strided views. The kernels `load_kernels` loads per mask are checked
against those the launch plans of vLLM-shaped batches ask for (launch path faked on CPU).
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import Tensor

from sparsek import fp8
from sparsek.fp8 import FP8_DTYPE as FP8
from sparsek.integrations.vllm import kernels as vllm_kernels
from sparsek.launch import kvcache, launcher
from sparsek.masks import make_mask
from sparsek.reference_varlen import reference_attention_kvcache
from sparsek.tuning import Workload

# KVCacheLayout: physical axis k is logical axis ORDER[k] of (L, B, H, N, C).
LAYOUTS = {"LBNHC": (0, 1, 3, 2, 4), "LBHNC": (0, 1, 2, 3, 4)}


def layer_cache(
    layout: str, num_blocks: int, hkv: int, block_size: int, d: int, seed: int = 0, dtype=None
):
    """(raw buffer, layer 1's view (num_blocks, Hkv, block_size, 2D)), random contents
    in `dtype` (default float16)."""
    logical = (2, num_blocks, hkv, block_size, 2 * d)
    order = LAYOUTS[layout]
    gen = torch.Generator().manual_seed(seed)
    raw = torch.randn(*(logical[i] for i in order), generator=gen).to(dtype or torch.float16)
    inverse = sorted(range(5), key=lambda i: order[i])
    return raw, raw.permute(*inverse)[1]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_split_kv_cache_gives_views_in_kernel_layout(layout: str) -> None:
    _, kv_cache = layer_cache(layout, 5, 2, 16, 64)
    k_cache, v_cache = vllm_kernels.split_kv_cache(kv_cache, 64)
    assert k_cache.shape == v_cache.shape == (5, 16, 2, 64)
    assert k_cache.data_ptr() == kv_cache.data_ptr()
    assert v_cache.data_ptr() == kv_cache.data_ptr() + 64 * kv_cache.element_size()
    assert torch.equal(k_cache[3, 7, 1], kv_cache[3, 1, 7, :64])
    assert torch.equal(v_cache[3, 7, 1], kv_cache[3, 1, 7, 64:])


def test_split_kv_cache_fixes_singleton_head_strides() -> None:
    raw = torch.zeros(4, 16, 1, 128, dtype=torch.float16)  # one KV head
    odd = raw.as_strided((4, 1, 16, 128), (16 * 128, 3, 128, 1))  # size-1 axis, stride 3
    k_cache, _ = vllm_kernels.split_kv_cache(odd, 64)
    assert k_cache.stride() == (16 * 128, 128, 64, 1)


@pytest.mark.parametrize(
    ("shape", "match"),
    [((4, 2, 16, 100), "2 \\* head_size"), ((4, 2, 16), "num_blocks, num_kv_heads")],
)
def test_split_kv_cache_rejects_wrong_shapes(shape, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        vllm_kernels.split_kv_cache(torch.zeros(shape, dtype=torch.float16), 64)


def test_split_kv_cache_rejects_a_cache_the_kernels_cannot_read_in_place() -> None:
    # head_size 60: V starts 120 bytes into each row (not 16-byte aligned).
    kv_cache = torch.zeros(4, 2, 16, 120, dtype=torch.float16)
    with pytest.raises(ValueError, match="in place"):
        vllm_kernels.split_kv_cache(kv_cache, 60)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_store_kv_writes_valid_slots_only(layout: str) -> None:
    raw, kv_cache = layer_cache(layout, 6, 2, 16, 32)
    want_raw, want = layer_cache(layout, 6, 2, 16, 32)  # same contents, another buffer
    slots = [17, -1, 95, 16 * 3 + 5, -1, 16 * 5 + 15]
    key = torch.randn(len(slots) + 2, 2, 32).to(torch.float16)  # 2 rows past the mapping
    value = torch.randn(len(slots) + 2, 2, 32).to(torch.float16)
    k_cache, v_cache = vllm_kernels.split_kv_cache(kv_cache, 32)
    vllm_kernels.store_kv(key, value, k_cache, v_cache, torch.tensor(slots))
    wk, wv = vllm_kernels.split_kv_cache(want, 32)
    for i, slot in enumerate(slots):
        if slot >= 0:
            wk[slot // 16, slot % 16] = key[i]
            wv[slot // 16, slot % 16] = value[i]
    assert torch.equal(raw, want_raw), "wrong slots written (or the other layer touched)"


@pytest.mark.parametrize("layout", LAYOUTS)
def test_store_kv_quantizes_into_an_fp8_cache(layout: str) -> None:
    """vLLM's kv_cache_dtype="fp8": each new key / k_scale and value / v_scale rounded to
    nearest E4M3 (checked against values picked by hand: 1.0 / 0.5 is 2, 0.3 / 0.5 = 0.6
    rounds to 0.625, 1000 / 0.5 saturates at 448), the rows at their slots, nothing else
    written."""
    raw, kv_cache = layer_cache(layout, 6, 2, 16, 32, dtype=FP8)
    want_raw, want = layer_cache(layout, 6, 2, 16, 32, dtype=FP8)
    slots = [17, -1, 95, 16 * 3 + 5]
    key = torch.randn(len(slots) + 1, 2, 32).to(torch.bfloat16)
    value = torch.randn(len(slots) + 1, 2, 32).to(torch.bfloat16)
    key[0, 0, :3] = torch.tensor([1.0, 0.3, 1000.0])
    scales = (torch.tensor([0.5]), torch.tensor([0.25]))
    k_cache, v_cache = vllm_kernels.split_kv_cache(kv_cache, 32)
    vllm_kernels.store_kv(key, value, k_cache, v_cache, torch.tensor(slots), scales)
    assert k_cache[1, 1, 0, :3].float().tolist() == [2.0, 0.625, 448.0]
    wk, wv = vllm_kernels.split_kv_cache(want, 32)
    for i, slot in enumerate(slots):
        if slot >= 0:
            wk[slot // 16, slot % 16] = fp8.quantize(key[i], scales[0])
            wv[slot // 16, slot % 16] = fp8.quantize(value[i], scales[1])
    assert torch.equal(raw.view(torch.uint8), want_raw.view(torch.uint8))


@pytest.mark.parametrize(
    ("cache", "key", "scales", "match"),
    [
        (FP8, torch.float16, None, "float8_e4m3fn caches need scales"),
        (torch.float16, torch.float16, "ok", "scales are for float8_e4m3fn caches"),
        (FP8, torch.float32, "ok", "float8_e4m3fn caches take float16 or bfloat16"),
        (torch.float16, torch.bfloat16, None, "must match the cache's"),
        (FP8, torch.float16, (torch.ones(2), torch.ones(1)), r"k_scale must be a one-element"),
        (FP8, torch.float16, (torch.ones(1), torch.ones(1).double()), "v_scale must be"),
        (FP8, torch.float16, (1.0, torch.ones(1)), "got float"),
    ],
)
def test_store_kv_refuses_mismatched_dtypes_and_scales(cache, key, scales, match) -> None:
    _, kv_cache = layer_cache("LBNHC", 3, 2, 16, 32, dtype=cache)
    k_cache, v_cache = vllm_kernels.split_kv_cache(kv_cache, 32)
    new = torch.randn(2, 2, 32).to(key)
    if scales == "ok":
        scales = (torch.ones(1), torch.ones(1))
    with pytest.raises(ValueError, match=match):
        vllm_kernels.store_kv(new, new, k_cache, v_cache, torch.tensor([1, 2]), scales)


def test_store_kv_with_only_padding_changes_nothing() -> None:
    raw, kv_cache = layer_cache("LBNHC", 3, 2, 16, 32)
    before = raw.clone()
    k_cache, v_cache = vllm_kernels.split_kv_cache(kv_cache, 32)
    key = torch.randn(3, 2, 32).to(torch.float16)
    vllm_kernels.store_kv(key, key, k_cache, v_cache, torch.tensor([-1, -1, -1]))
    vllm_kernels.store_kv(key[:0], key[:0], k_cache, v_cache, torch.tensor([], dtype=torch.int64))
    assert torch.equal(raw, before)


def reference(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    """float64 bottom-right causal attention of one sequence: q (n, H, D), k/v (L, Hkv, D)."""
    n, h, _ = q.shape
    length, hkv, _ = k.shape
    kk = k.double().repeat_interleave(h // hkv, dim=1)
    vv = v.double().repeat_interleave(h // hkv, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.double(), kk) * scale
    visible = torch.arange(length).view(1, -1) <= torch.arange(n).view(-1, 1) + (length - n)
    probs = scores.masked_fill(~visible, -math.inf).softmax(-1)
    return torch.einsum("hqk,khd->qhd", probs, vv)


def mixed_batch(contexts: list[int], new: list[int], h: int, hkv: int, d: int, block_size: int):
    """A step's batch over a cache filled by store_kv: (q per sequence, k/v per sequence,
    paged_attention's arguments but the scale and output)."""
    lens = [c + n for c, n in zip(contexts, new, strict=True)]
    num_blocks = sum(-(-n // block_size) for n in lens) + 2
    _, kv_cache = layer_cache("LBNHC", num_blocks, hkv, block_size, d, seed=1)
    k_cache, v_cache = vllm_kernels.split_kv_cache(kv_cache, d)
    blocks = (torch.randperm(num_blocks - 1) + 1).tolist()  # never block 0 (vLLM's null block)
    table = torch.zeros(len(lens), max(-(-n // block_size) for n in lens) + 1, dtype=torch.int32)
    ks = [torch.randn(n, hkv, d).to(torch.float16) for n in lens]
    vs = [torch.randn(n, hkv, d).to(torch.float16) for n in lens]
    slot_rows = []
    for b, length in enumerate(lens):
        used = -(-length // block_size)
        table[b, :used] = torch.tensor([blocks.pop() for _ in range(used)])
        slot_rows += [
            (int(table[b, t // block_size]) * block_size + t % block_size, b, t)
            for t in range(length)
        ]
    key = torch.stack([ks[b][t] for _, b, t in slot_rows])
    value = torch.stack([vs[b][t] for _, b, t in slot_rows])
    vllm_kernels.store_kv(key, value, k_cache, v_cache, torch.tensor([s for s, _, _ in slot_rows]))
    qs = [torch.randn(n, h, d).to(torch.float16) for n in new]
    starts = torch.tensor([0, *torch.tensor(new).cumsum(0).tolist()], dtype=torch.int32)
    args = (torch.cat(qs), k_cache, v_cache, starts, torch.tensor(lens, dtype=torch.int32))
    return qs, ks, vs, (*args, table, max(new))


def test_paged_attention_mixed_batch_matches_dense_attention() -> None:
    torch.manual_seed(0)
    h, hkv, d, block_size = 4, 2, 32, 16
    contexts, new = [40, 0, 17, 5], [1, 9, 4, 1]  # decode, prefill, chunked prefill, decode
    lens = [c + n for c, n in zip(contexts, new, strict=True)]
    _, kv_cache = layer_cache("LBNHC", 12, hkv, block_size, d, seed=1)
    k_cache, v_cache = vllm_kernels.split_kv_cache(kv_cache, d)
    blocks = (torch.randperm(11) + 1).tolist()  # never block 0 (vLLM's null block)
    table = torch.zeros(len(lens), 4, dtype=torch.int32)
    ks = [torch.randn(n, hkv, d).to(torch.float16) for n in lens]
    vs = [torch.randn(n, hkv, d).to(torch.float16) for n in lens]
    slot_rows = []
    for b, length in enumerate(lens):
        used = -(-length // block_size)
        table[b, :used] = torch.tensor([blocks.pop() for _ in range(used)])
        slot_rows += [
            (int(table[b, t // block_size]) * block_size + t % block_size, b, t)
            for t in range(length)
        ]
    slots = torch.tensor([s for s, _, _ in slot_rows])
    key = torch.stack([ks[b][t] for _, b, t in slot_rows])
    value = torch.stack([vs[b][t] for _, b, t in slot_rows])
    vllm_kernels.store_kv(key, value, k_cache, v_cache, slots)

    qs = [torch.randn(n, h, d).to(torch.float16) for n in new]
    starts = torch.tensor([0, *torch.tensor(new).cumsum(0).tolist()], dtype=torch.int32)
    output = torch.full((sum(new) + 3, h, d), float("nan"), dtype=torch.float16)
    scale = 0.2
    vllm_kernels.paged_attention(
        torch.cat(qs),
        k_cache,
        v_cache,
        starts,
        torch.tensor(lens, dtype=torch.int32),
        table,
        max(new),
        scale,
        output[: sum(new)],
    )
    want = torch.cat([reference(q, k, v, scale) for q, k, v in zip(qs, ks, vs, strict=True)])
    torch.testing.assert_close(output[: sum(new)].double(), want, atol=2e-3, rtol=2e-3)
    assert output[sum(new) :].isnan().all(), "rows past the batch must not be written"


@pytest.mark.parametrize(
    ("sliding_window", "window_size"), [(None, (-1, -1)), (1, (0, 0)), (128, (127, 0))]
)
def test_window_size_of_vllms_sliding_window(sliding_window, window_size) -> None:
    assert vllm_kernels.window_size_of(sliding_window) == window_size


@pytest.mark.parametrize("sliding_window", [0, -1, True, 16.0, "16"])
def test_window_size_of_refuses_what_is_not_a_window(sliding_window) -> None:
    with pytest.raises(ValueError, match="sliding_window="):
        vllm_kernels.window_size_of(sliding_window)


# (sliding_window, softcap, sinks): each on its own and together.
MASKS = [
    (16, 0.0, None),
    (None, 2.0, None),
    (None, 0.0, [-1.0, 0.5, 1.5, 3.0]),
    (16, 2.0, [-1.0, 0.5, 1.5, 3.0]),
]


@pytest.mark.parametrize(("sliding_window", "softcap", "sinks"), MASKS, ids=str)
def test_paged_attention_with_masks_matches_the_reference(sliding_window, softcap, sinks) -> None:
    """Decodes, a prefill and chunked prefills (one longer than the window) with the
    window of vLLM's sliding_window, a softcap and sinks, against sparsek's float64
    reference over the dense K/V of each sequence."""
    torch.manual_seed(2)
    h, hkv, d, block_size = 4, 2, 32, 16
    contexts, new = [40, 0, 17, 5, 50], [1, 9, 4, 1, 20]
    qs, ks, vs, args = mixed_batch(contexts, new, h, hkv, d, block_size)
    window = vllm_kernels.window_size_of(sliding_window)
    sink_logits = None if sinks is None else torch.tensor(sinks)
    output = torch.full((sum(new) + 3, h, d), float("nan"), dtype=torch.float16)
    scale = 0.3
    vllm_kernels.paged_attention(
        *args, scale, output[: sum(new)], window_size=window, softcap=softcap, sinks=sink_logits
    )
    want = torch.cat(
        [
            reference_attention_kvcache(
                q[None], k[None], v[None], torch.tensor([k.shape[0]], dtype=torch.int32),
                causal=True, softmax_scale=scale, window_size=window, softcap=softcap,
                sinks=sink_logits, compute_dtype=torch.float64,
            )[0][0]
            for q, k, v in zip(qs, ks, vs, strict=True)
        ]
    )  # fmt: skip
    torch.testing.assert_close(output[: sum(new)].double(), want, atol=2e-3, rtol=2e-3)
    assert output[sum(new) :].isnan().all(), "rows past the batch must not be written"


class Loads(list):
    """What the launch path loaded: ("forward", mask spec, layout, workload, cache dtype),
    ("combine", adds sinks) and ("kv_store", cache dtype) entries, in order."""


@pytest.fixture
def fake_loads(monkeypatch: pytest.MonkeyPatch) -> Loads:
    """The launch path on CPU: kernel loads recorded, tiles of 128 x 128, 132 SMs."""
    loads = Loads()

    def forward_kernel(
        device, head_dim, dtype, mask, layout, workload=Workload.DEFAULT, head_dim_v=None,
        cache_dtype=None,
    ):  # fmt: skip
        loads.append(("forward", mask, layout, workload, cache_dtype))
        return SimpleNamespace(fn=None, config=None)

    monkeypatch.setattr(launcher, "forward_kernel", forward_kernel)

    def combine_kernel(device, head_dim, dtype, sinks=False):
        loads.append(("combine", sinks))

    monkeypatch.setattr(launcher, "combine_kernel", combine_kernel)

    def kv_store_kernel(device, head_dim, dtype, cache_dtype=None):
        loads.append(("kv_store", cache_dtype))

    monkeypatch.setattr(launcher, "kv_store_kernel", kv_store_kernel)
    monkeypatch.setattr(
        launcher, "kernel_config", lambda *a: SimpleNamespace(tile_m=128, tile_n=128)
    )
    monkeypatch.setattr(launcher, "num_sms", lambda index: 132)
    return loads


LAYER_MASKS = [  # (sliding_window, softcap, has_sinks)
    (None, 0.0, False),
    (None, 30.0, False),
    (None, 0.0, True),
    (128, 0.0, False),
    (128, 30.0, True),
]


@pytest.mark.parametrize("cache_dtype", [None, FP8], ids=["fp16-cache", "fp8-cache"])
@pytest.mark.parametrize(("sliding_window", "softcap", "has_sinks"), LAYER_MASKS, ids=str)
def test_load_kernels_loads_what_the_plans_of_a_layer_launch(
    fake_loads, sliding_window, softcap, has_sinks, cache_dtype
) -> None:
    """For each mask and cache dtype (the model's, or FP8): the kernels load_kernels
    loads are those the launch plans of vLLM-shaped batches use (decodes small and
    filling the GPU, uniform and with padding rows; mixed batches, few and many
    sequences, short and long caches), nothing missing (a kernel compiled mid-serving, or
    during CUDA-graph capture) and nothing spare: decode takes the single-query kernels
    with every mask (a window too), split kernels leave sinks to a combine that adds
    them; an FP8 cache's kernels convert it (and its store quantizes)."""
    window = vllm_kernels.window_size_of(sliding_window)
    device = torch.device("cuda", 0)  # a key only: nothing runs
    vllm_kernels.load_kernels(
        device, 64, torch.float16, 16, window_size=window, softcap=softcap,
        has_sinks=has_sinks, cache_dtype=cache_dtype,
    )  # fmt: skip
    loaded = set(fake_loads)
    assert len(loaded) == len(fake_loads), "a kernel loaded twice"
    fake_loads.clear()

    h, hkv, d, block_size = 8, 2, 64, 16
    mask = make_mask(True, window, softcap, has_sinks)
    for batch, q_lens, capacity in [
        (3, [1] * 3, 4096),  # decode: 6 CTAs, split
        (20, [1] * 20, 1024),  # decode: 40 CTAs over a short cache, not split
        (100, [1] * 100, 1024),  # decode: 200 CTAs fill the GPU
        (4, [1] * 4 + [0] * 2, 4096),  # decode, 2 padding tokens past the batch
        (4, [1, 17, 300, 1], 4096),  # mixed
        (64, [1] * 60 + [40] * 4, 2048),  # mixed, many sequences
    ]:
        total = sum(q_lens)
        q = torch.zeros(total, h, d, dtype=torch.float16)
        k_cache = torch.zeros(batch * capacity // block_size, block_size, hkv, d)
        k_cache = k_cache.to(cache_dtype or torch.float16)
        table = torch.zeros(batch, capacity // block_size, dtype=torch.int32)
        starts = torch.tensor([0, *torch.tensor(q_lens[:batch]).cumsum(0).tolist()])
        plan = kvcache.kvcache_plan(
            q, k_cache, k_cache, torch.zeros(batch, dtype=torch.int32), table,
            starts.to(torch.int32), max(q_lens), mask, 0,
        )  # fmt: skip
        assert not isinstance(plan, str) and plan.answer == "launch", plan
    used = set(fake_loads) | {("kv_store", cache_dtype)}  # store_kv's kernel (not the plans')
    assert used <= loaded, f"not preloaded: {used - loaded}"
    assert loaded <= used, f"preloaded, never used: {loaded - used}"
    forward = [load for load in loaded if load[0] == "forward"]
    assert any(layout.single_query for _, _, layout, _, _ in forward)
    assert all(
        spec.sinks == (has_sinks and not layout.split_kv) for _, spec, layout, _, _ in forward
    )
    assert all(cache == cache_dtype for *_, cache in forward)
    assert ("combine", has_sinks) in loaded and ("kv_store", cache_dtype) in loaded


@pytest.mark.parametrize("cache_dtype", [None, FP8], ids=["fp16-cache", "fp8-cache"])
@pytest.mark.parametrize(("sliding_window", "softcap", "has_sinks"), LAYER_MASKS, ids=str)
def test_every_kernel_load_kernels_asks_for_is_registered(
    monkeypatch: pytest.MonkeyPatch, sliding_window, softcap, has_sinks, cache_dtype
) -> None:
    """The registry (and each kernel's `can_implement`) serves every kernel a layer's
    mask needs, for the head sizes and dtypes the backend declares with either cache
    dtype (sm_90a forced; the kernels' configs are collected, not compiled)."""
    pytest.importorskip("cutlass", reason="needs the CuTe DSL (nvidia-cutlass-dsl)")
    from cutedsl_kernels.config import CombineConfig, FmhaFwdConfig, KVStoreConfig

    monkeypatch.setenv("SPARSEK_ARCH", "sm_90a")
    configs: list[object] = []
    monkeypatch.setattr(launcher, "get_kernel", lambda config: configs.append(config))
    window = vllm_kernels.window_size_of(sliding_window)
    for head_size in (64, 128):
        for dtype in (torch.float16, torch.bfloat16):
            vllm_kernels.load_kernels(
                torch.device("cuda", 0), head_size, dtype, 16,
                window_size=window, softcap=softcap, has_sinks=has_sinks,
                cache_dtype=cache_dtype,
            )  # fmt: skip
    fwd = [c for c in configs if isinstance(c, FmhaFwdConfig)]
    cache = None if cache_dtype is None else "float8_e4m3fn"
    assert all(c.dtypes.cache == cache for c in fwd)
    stores = [c for c in configs if isinstance(c, KVStoreConfig)]
    assert len(stores) == 4 and all(c.quantizes == (cache is not None) for c in stores)
    assert fwd and all(c.mask.window == bool(sliding_window) for c in fwd)
    assert all(c.mask.softcap == bool(softcap) for c in fwd)
    assert all(c.mask.sinks == (has_sinks and not c.split_kv) for c in fwd)  # split: combine
    combines = [c for c in configs if isinstance(c, CombineConfig)]
    assert combines and all(c.sinks == has_sinks for c in combines)


@pytest.mark.slow
def test_load_kernels_compiles_every_kernel_the_backend_launches(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The vLLM builder's warm-up, with the real CuTe DSL compiler (no GPU: the arch is
    forced to sm_90a; kernels compile and load on the CPU): the decode, packed-causal and
    split variants of the paged kernel for this block size, the combine and the cache
    update, each loaded once."""
    pytest.importorskip("cutlass", reason="needs the CuTe DSL (nvidia-cutlass-dsl)")
    from cutedsl_kernels.config import CombineConfig, FmhaFwdConfig, KVStoreConfig
    from sparsek.launch import launcher
    from sparsek.tuning import Workload

    monkeypatch.setenv("SPARSEK_ARCH", "sm_90a")
    loaded: list[object] = []  # the configs of the kernels loaded, in order
    get_kernel = launcher.get_kernel
    monkeypatch.setattr(launcher, "get_kernel", lambda c: loaded.append(c) or get_kernel(c))
    device = torch.device("cuda", 0)  # only a key here: nothing is launched
    vllm_kernels.load_kernels(device, 64, torch.float16, 32)
    fwd = [c for c in loaded if isinstance(c, FmhaFwdConfig)]
    assert {(c.mask.causal, c.varlen_q, c.single_query, c.split_kv) for c in fwd} == {
        (False, True, True, False),  # decode: one packed query per sequence, group rows
        (False, True, True, True),
        (True, True, False, False),  # packed queries, causal
        (True, True, False, True),
    }
    assert all(c.kv_layout == "paged" and c.page_size == 32 for c in fwd)
    decode = next(c for c in fwd if c.single_query and not c.split_kv)
    fills_gpu = launcher.forward_kernel(
        device, 64, torch.float16, decode.mask, decode.layout, Workload.DECODE_FILLS_GPU
    )
    assert fills_gpu.config in fwd  # decode of a batch that fills the GPU
    assert [c for c in loaded if isinstance(c, CombineConfig)] == [
        CombineConfig("sm_90a", 64, "float16")
    ]
    assert [c for c in loaded if isinstance(c, KVStoreConfig)] == [
        KVStoreConfig("sm_90a", 64, "float16")
    ]
    assert len(loaded) == len(fwd) + 2 == 7  # each kernel loaded once
    vllm_kernels.load_kernels(device, 64, torch.float16, 32)
    assert len(loaded) == 7  # ... and then served from the launch path's memos


@pytest.mark.slow
def test_load_kernels_compiles_the_kernels_of_an_fp8_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    """`test_load_kernels_compiles_every_kernel_the_backend_launches` over an FP8 cache
    (vLLM's kv_cache_dtype="fp8"): the paged kernels that convert the cache (decode and
    packed causal queries, split and not; no two-CTA decode), the combine and the cache
    update that quantizes, each compiled and loaded once."""
    pytest.importorskip("cutlass", reason="needs the CuTe DSL (nvidia-cutlass-dsl)")
    from cutedsl_kernels.config import FmhaFwdConfig, KVStoreConfig

    monkeypatch.setenv("SPARSEK_ARCH", "sm_90a")
    loaded: list[object] = []
    get_kernel = launcher.get_kernel
    monkeypatch.setattr(launcher, "get_kernel", lambda c: loaded.append(c) or get_kernel(c))
    device = torch.device("cuda", 0)  # only a key here: nothing is launched
    vllm_kernels.load_kernels(device, 128, torch.bfloat16, 16, cache_dtype=FP8)
    fwd = [c for c in loaded if isinstance(c, FmhaFwdConfig)]
    assert {(c.mask.causal, c.single_query, c.split_kv) for c in fwd} == {
        (False, True, False),
        (False, True, True),
        (True, False, False),
        (True, False, True),
    }
    assert all(c.dtypes.cache == "float8_e4m3fn" and c.tile_m == 64 for c in fwd)
    assert [c for c in loaded if isinstance(c, KVStoreConfig)] == [
        KVStoreConfig("sm_90a", 128, "bfloat16", "float8_e4m3fn")
    ]
    assert len(loaded) == len(set(loaded)) == 6


@pytest.mark.slow
@pytest.mark.parametrize(("sliding_window", "softcap", "has_sinks"), LAYER_MASKS[1:], ids=str)
def test_load_kernels_compiles_the_kernels_of_a_masked_layer(
    monkeypatch: pytest.MonkeyPatch, sliding_window, softcap, has_sinks
) -> None:
    """`test_load_kernels_compiles_every_kernel_the_backend_launches` for layers with a
    softcap, sinks, a window, and all three: every kernel compiles, each loads once."""
    pytest.importorskip("cutlass", reason="needs the CuTe DSL (nvidia-cutlass-dsl)")
    from cutedsl_kernels.config import FmhaFwdConfig

    monkeypatch.setenv("SPARSEK_ARCH", "sm_90a")
    loaded: list[object] = []
    get_kernel = launcher.get_kernel
    monkeypatch.setattr(launcher, "get_kernel", lambda c: loaded.append(c) or get_kernel(c))
    mask = dict(
        window_size=vllm_kernels.window_size_of(sliding_window),
        softcap=softcap,
        has_sinks=has_sinks,
    )
    device = torch.device("cuda", 0)  # only a key here: nothing is launched
    vllm_kernels.load_kernels(device, 128, torch.bfloat16, 16, **mask)
    fwd = [c for c in loaded if isinstance(c, FmhaFwdConfig)]
    assert fwd and len(set(loaded)) == len(loaded)
    assert all(c.mask.sinks == (has_sinks and not c.split_kv) for c in fwd)  # split: combine
    assert any(c.single_query for c in fwd)  # decode, windowed or not
    count = len(loaded)
    vllm_kernels.load_kernels(device, 128, torch.bfloat16, 16, **mask)
    assert len(loaded) == count
