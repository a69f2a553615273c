"""sparsek's vLLM backend (`SPARSEK`) with the real vllm 0.33.0, on CPU.

vLLM is installed in its own environment by `containers/sparsek.sh test` (it pins packages
the main one pins differently); elsewhere this module is skipped. On CPU vLLM runs with
VLLM_TARGET_DEVICE=cpu (it cannot infer a device otherwise) and its platform never selects
a plugin backend, so the backend's classes are driven directly, as vLLM's GPU model runner
drives them: the selector's `validate_configuration`, the builder on hand-made
`CommonAttentionMetadata`, `do_kv_cache_update` then `forward` on a cache allocated by vLLM's
own `create_kv_cache_views`.

Compared against: float64 attention per sequence computed here from the dense K/V generated
before they were written (forward runs sparsek's CPU reference path); the cache bytes written
by plain indexing (do_kv_cache_update).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("vllm", reason="vllm is not installed (containers/sparsek.sh test adds it)")

import torch
from vllm.platforms.interface import DeviceCapability
from vllm.v1.attention.backend import CommonAttentionMetadata
from vllm.v1.attention.backends.registry import AttentionBackendEnum
from vllm.v1.kv_cache_interface import (
    FullAttentionSpec,
    KVCacheTensor,
    create_kv_cache_views,
)
from vllm.v1.kv_cache_layout import KVCacheLayout

from sparsek import fp8
from sparsek.integrations.vllm import plugin as vllm_plugin
from sparsek.integrations.vllm.backend import (
    SparseKBackend,
    SparseKImpl,
    SparseKMetadataBuilder,
)

H, HKV, D, BLOCK = 4, 2, 64, 16
SUPPORTED = dict(
    head_size=128,
    dtype=torch.bfloat16,
    kv_cache_dtype="auto",
    block_size=16,
    use_mla=False,
    has_sink=False,
    use_sparse=False,
    use_mm_prefix=False,
    use_per_head_quant_scales=False,
    device_capability=DeviceCapability(9, 0),
    attn_type="decoder",
)


# ---------------------------------------------------------------------------- registration


def test_entry_point_registers_the_backend_in_a_fresh_process() -> None:
    """vLLM's own plugin loader finds the entry point (pyproject.toml) and registers it."""
    code = (
        "from vllm.plugins import load_general_plugins\n"
        "load_general_plugins()\n"
        "from vllm.v1.attention.backends.registry import AttentionBackendEnum as E\n"
        "print(E['SPARSEK'].get_path())\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr[-2000:]
    backend = "sparsek.integrations.vllm.backend.SparseKBackend"
    assert done.stdout.strip().splitlines()[-1] == backend


def test_register_is_idempotent_and_resolves_the_class() -> None:
    vllm_plugin.register()
    vllm_plugin.register()
    member = AttentionBackendEnum["SPARSEK"]
    assert member.get_class() is SparseKBackend
    assert SparseKBackend.get_name() == member.name == "SPARSEK"
    assert list(AttentionBackendEnum.__members__).count("SPARSEK") == 1


def test_config_naming_the_backend_unpickles_in_a_process_without_plugins() -> None:
    """vLLM's engine and worker processes, started with "spawn", unpickle the config before
    they load any plugin: the SPARSEK member must resolve there all the same."""
    import pickle

    from vllm.config.attention import AttentionConfig

    vllm_plugin.register()
    blob = pickle.dumps(AttentionConfig(backend="SPARSEK"))
    code = (
        "import pickle, sys\n"
        "config = pickle.loads(sys.stdin.buffer.read())\n"
        "print(config.backend.name, config.backend.get_path())\n"
    )
    env = {**os.environ, "VLLM_PLUGINS": ""}  # no entry point may run in the child
    done = subprocess.run(
        [sys.executable, "-c", code], input=blob, capture_output=True, env=env, timeout=300
    )
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    assert done.stdout.decode().split() == ["SPARSEK", vllm_plugin.BACKEND_CLASS]
    assert pickle.loads(blob).backend is AttentionBackendEnum["SPARSEK"]  # same process


def test_cli_flag_and_engine_config_accept_the_name(tmp_path: Path) -> None:
    """`--attention-backend sparsek` parses, and the engine config resolves it (the
    CLI value is upper-cased by vLLM), for a local tiny Llama (no hub access)."""
    from vllm.engine.arg_utils import EngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    vllm_plugin.register()
    (tmp_path / "config.json").write_text(json.dumps(TINY_LLAMA))
    parser = EngineArgs.add_cli_args(FlexibleArgumentParser())
    args = parser.parse_args(
        ["--model", str(tmp_path), "--skip-tokenizer-init", "--attention-backend", "sparsek"]
    )
    config = EngineArgs.from_cli_args(args).create_engine_config()
    assert config.attention_config.backend is AttentionBackendEnum["SPARSEK"]


TINY_LLAMA = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "num_hidden_layers": 2,
    "vocab_size": 256,
    "max_position_embeddings": 512,
    "rms_norm_eps": 1e-6,
    "torch_dtype": "float16",
    "head_dim": 16,
}


# ---------------------------------------------------------------------------- capabilities


def test_validate_configuration_accepts_the_supported_config() -> None:
    from vllm.v1.attention.selector import AttentionSelectorConfig

    # Exactly how vLLM's CUDA platform calls it for a selected backend.
    selector = AttentionSelectorConfig(
        head_size=128, dtype=torch.bfloat16, kv_cache_dtype="auto", block_size=None
    )
    capability = DeviceCapability(9, 0)
    assert (
        SparseKBackend.validate_configuration(device_capability=capability, **selector._asdict())
        == []
    )
    assert SparseKBackend.validate_configuration(**SUPPORTED) == []
    assert SparseKBackend.validate_configuration(**{**SUPPORTED, "block_size": None}) == []
    for head_size, dtype in ((64, torch.float16), (128, torch.float16), (64, torch.bfloat16)):
        config = {**SUPPORTED, "head_size": head_size, "dtype": dtype}
        assert SparseKBackend.validate_configuration(**config) == []
        # FP8 E4M3 caches with per-tensor scales, under the model's dtype
        for cache in ("fp8", "fp8_e4m3"):
            config = {**config, "kv_cache_dtype": cache}
            assert SparseKBackend.validate_configuration(**config) == []
    # Layers with a sliding window, attention sinks or both (gpt-oss).
    for masks in ({"has_sliding_window": True}, {"has_sink": True}):
        assert SparseKBackend.validate_configuration(**{**SUPPORTED, **masks}) == []
    selector = AttentionSelectorConfig(
        head_size=64,
        dtype=torch.bfloat16,
        kv_cache_dtype="auto",
        block_size=None,
        has_sink=True,
        has_sliding_window=True,
    )
    assert (
        SparseKBackend.validate_configuration(device_capability=capability, **selector._asdict())
        == []
    )


@pytest.mark.parametrize(
    ("changes", "fragment"),
    [
        (
            {"head_size": 80},
            "head_size=80 is not supported (supported: 32, 64, 96, 128, 192, 256)",
        ),
        ({"dtype": torch.float32}, "dtype=torch.float32 is not supported"),
        ({"kv_cache_dtype": "fp8_e5m2"}, "kv_cache_dtype=fp8_e5m2 is not supported"),
        ({"kv_cache_dtype": "float16"}, "differs from the model dtype bfloat16"),
        (
            {"kv_cache_dtype": "fp8", "head_size": 256},
            "kv_cache_dtype=fp8 with head_size=256: sparsek's FP8-cache kernels on sm_90a "
            "serve head sizes [64, 128]",
        ),
        ({"use_per_head_quant_scales": True}, "per"),
        ({"block_size": 8}, "block_size=8 is not supported (supported: multiples of 16)"),
        ({"device_capability": DeviceCapability(8, 0)}, "compute capability 8.0"),
        ({"device_capability": DeviceCapability(10, 0)}, "compute capability 10.0"),
        ({"attn_type": "encoder_only"}, "encoder_only"),
        ({"use_mla": True}, "mla"),
        ({"use_non_causal": True}, "causal"),
        ({"use_rswa": True}, "R-SWA (model_config.rswa_window"),
    ],
)
def test_validate_configuration_names_what_is_unsupported(changes: dict, fragment: str) -> None:
    reasons = SparseKBackend.validate_configuration(**{**SUPPORTED, **changes})
    assert any(fragment.lower() in r.lower() for r in reasons), reasons


def test_declared_capabilities() -> None:
    assert SparseKBackend.get_supported_head_sizes() == [32, 64, 96, 128, 192, 256]
    assert SparseKBackend.supports_block_size(16) and SparseKBackend.supports_block_size(64)
    assert not SparseKBackend.supports_block_size(24)
    assert SparseKBackend.forward_includes_kv_cache_update is False
    assert SparseKBackend.supports_sliding_window() and SparseKBackend.supports_sink()
    assert not SparseKBackend.supports_rswa() and not SparseKBackend.supports_alibi_sqrt()
    assert SparseKBackend.supports_attn_type("decoder")
    assert not SparseKBackend.supports_attn_type("encoder_decoder")
    support = SparseKMetadataBuilder.get_cudagraph_support(None, None)
    assert support.name == "UNIFORM_SINGLE_TOKEN_DECODE"


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"alibi_slopes": [0.5] * H}, "ALiBi"),
        ({"attn_type": "encoder"}, "attn_type=encoder"),
        ({"kv_cache_dtype": "fp8_e5m2"}, "kv_cache_dtype=fp8_e5m2 is not supported"),
        ({"sliding_window": 0}, "sliding_window=0 must be >= 1"),
        ({"sliding_window": -1}, "sliding_window=-1 must be >= 1"),
        ({"sliding_window": 64.0}, "sliding_window=64.0 must be a number of tokens"),
        ({"logits_soft_cap": -30.0}, "logits_soft_cap=-30.0 is not supported"),
        ({"logits_soft_cap": math.inf}, "logits_soft_cap=inf is not supported"),
        ({"logits_soft_cap": math.nan}, "logits_soft_cap=nan is not supported"),
        ({"sinks": torch.zeros(H, dtype=torch.float64)}, "sinks of dtype torch.float64"),
        ({"sinks": torch.zeros(H, dtype=torch.int32)}, "sinks of dtype torch.int32"),
        ({"sinks": torch.zeros(H + 1)}, "sinks of shape (5,) are not supported"),
        ({"sinks": torch.zeros(1, H)}, "(num_heads,) = (4,)"),
        ({"sinks": [0.0] * H}, "sinks must be a tensor"),
        ({"chunk_lookback": 4}, "chunk_lookback=4 is not supported"),
    ],
)
def test_impl_refuses_unsupported_layers(kwargs: dict, fragment: str) -> None:
    with pytest.raises(NotImplementedError, match="SPARSEK") as err:
        SparseKImpl(H, D, 0.125, HKV, **kwargs)
    assert fragment in str(err.value)


def test_impl_names_every_unsupported_argument_at_once() -> None:
    with pytest.raises(NotImplementedError) as err:
        SparseKImpl(
            H, D, 0.125, HKV, alibi_slopes=[1.0] * H, sliding_window=0,
            sinks=torch.zeros(H, dtype=torch.float64),
        )  # fmt: skip
    assert all(f in str(err.value) for f in ("ALiBi", "sliding_window=0", "float64"))


@pytest.mark.parametrize(
    ("sliding_window", "window_size"),
    [(None, (-1, -1)), (1, (0, 0)), (16, (15, 0)), (4096, (4095, 0))],
)
@pytest.mark.parametrize("logits_soft_cap", [None, 0, 0.0, 30, 50.0])
def test_impl_converts_vllms_mask_arguments(sliding_window, window_size, logits_soft_cap) -> None:
    """As vLLM's FlashAttention backend does: (sliding_window - 1, 0) for a decoder layer,
    no cap for None or 0."""
    impl = SparseKImpl(
        H, D, 0.125, HKV, sliding_window=sliding_window, logits_soft_cap=logits_soft_cap
    )
    assert impl.window_size == window_size and impl.sliding_window == sliding_window
    assert impl.logits_soft_cap == float(logits_soft_cap or 0) and impl.sinks is None
    assert type(impl.logits_soft_cap) is float


def test_bfloat16_sinks_are_read_as_float32_into_one_persistent_tensor() -> None:
    """vLLM builds the layer with the model's sink parameter (bfloat16, -inf until the
    checkpoint loads into it), then calls process_weights_after_loading (again after a
    weight reload): the float32 tensor the kernels read is made once and refilled in
    place, so a CUDA graph captured on it reads the new values."""
    param = torch.nn.Parameter(torch.full((H,), -math.inf, dtype=torch.bfloat16), False)
    impl = SparseKImpl(H, D, 0.125, HKV, sinks=param)
    made = impl.sinks
    assert made is not None and made.dtype == torch.float32 and made.shape == (H,)
    assert torch.isneginf(made).all()
    address = made.data_ptr()
    for values in ([0.5, -1.25, 3.0, 7.5], [1.0, 2.0, -0.5, -8.0]):  # load, then a reload
        param.data.copy_(torch.tensor(values, dtype=torch.bfloat16))
        impl.process_weights_after_loading(torch.bfloat16)
        assert impl.sinks is made and made.data_ptr() == address
        assert torch.equal(made, torch.tensor(values, dtype=torch.float32))  # exact
    assert impl.sinks_source is param and param.dtype == torch.bfloat16  # untouched


def test_float32_sinks_are_read_in_place() -> None:
    param = torch.nn.Parameter(torch.zeros(H), False)
    impl = SparseKImpl(H, D, 0.125, HKV, sinks=param)
    assert impl.sinks is not None and impl.sinks.data_ptr() == param.data_ptr()
    param.data.copy_(torch.arange(H, dtype=torch.float32))
    assert torch.equal(impl.sinks, torch.arange(H, dtype=torch.float32))
    strided = torch.zeros(2 * H)[::2]  # not contiguous: copied into a float32 tensor
    impl = SparseKImpl(H, D, 0.125, HKV, sinks=strided)
    assert impl.sinks is not None and impl.sinks.is_contiguous()
    assert impl.sinks.data_ptr() != strided.data_ptr()


def test_vllms_attention_layer_builds_the_impl() -> None:
    """vLLM's own `Attention` layer with this backend: the impl built from its positional
    arguments, the layer's backend name resolved, its KV-cache spec what the builder gets;
    a gpt-oss-style layer (sliding window, sinks made by vLLM's `make_attention_sink`) and
    one with a sliding window and a logit softcap too; ALiBi still refused."""
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.model_executor.layers.attention import Attention
    from vllm.model_executor.model_loader.weight_utils import make_attention_sink
    from vllm.v1.kv_cache_interface import SlidingWindowSpec

    vllm_plugin.register()
    common = dict(num_heads=H, head_size=D, scale=0.125, num_kv_heads=HKV)
    with set_current_vllm_config(VllmConfig()):
        layer = Attention(
            **common, prefix="model.layers.0.self_attn.attn", attn_backend=SparseKBackend
        )
        spec = layer.get_kv_cache_spec(VllmConfig())
        sinks = make_attention_sink(H, dtype=torch.bfloat16)
        gpt_oss = Attention(
            **common,
            per_layer_sliding_window=128,
            prefix="model.layers.1.self_attn.attn",
            attn_backend=SparseKBackend,
            sinks=sinks,
        )
        capped = Attention(
            **common,
            per_layer_sliding_window=4096,
            logits_soft_cap=50.0,
            prefix="model.layers.2.self_attn.attn",
            attn_backend=SparseKBackend,
        )
        window_spec = gpt_oss.get_kv_cache_spec(VllmConfig())
        with pytest.raises(NotImplementedError, match="alibi_slopes: ALiBi"):
            Attention(
                **common,
                alibi_slopes=[0.5] * H,
                prefix="model.layers.3.self_attn.attn",
                attn_backend=SparseKBackend,
            )
    assert isinstance(layer.impl, SparseKImpl)
    assert (layer.impl.num_heads, layer.impl.num_kv_heads, layer.impl.head_size) == (H, HKV, D)
    assert layer.backend is AttentionBackendEnum["SPARSEK"]
    assert (spec.num_kv_heads, spec.head_size, spec.block_size) == (HKV, D, 16)
    assert layer.impl.window_size == (-1, -1) and layer.impl.sinks is None
    assert isinstance(gpt_oss.impl, SparseKImpl) and gpt_oss.impl.window_size == (127, 0)
    assert gpt_oss.impl.sinks_source is sinks and gpt_oss.impl.sinks is not None
    assert gpt_oss.impl.sinks.dtype == torch.float32
    assert isinstance(window_spec, SlidingWindowSpec) and window_spec.sliding_window == 128
    assert isinstance(capped.impl, SparseKImpl) and capped.impl.window_size == (4095, 0)
    assert capped.impl.logits_soft_cap == 50.0 and capped.impl.sinks is None
    # vLLM's loader fills the parameter, then runs the layer's hook.
    sinks.data.copy_(torch.linspace(-2, 2, H, dtype=torch.bfloat16))
    gpt_oss.process_weights_after_loading(torch.bfloat16)
    assert torch.equal(gpt_oss.impl.sinks, sinks.float())


def test_builder_preloads_the_kernels_of_each_mask_of_its_layers(monkeypatch) -> None:
    """The builder of a KV-cache group (one group may mix windowed and global layers: vLLM
    with its hybrid cache manager off) loads the kernels of each distinct mask of its
    layers once, found through the config's registry of layers; when that lists none of
    them, the group spec's own sliding window."""
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.model_executor.layers.attention import Attention
    from vllm.model_executor.model_loader.weight_utils import make_attention_sink
    from vllm.v1.kv_cache_interface import SlidingWindowSpec

    from sparsek.integrations.vllm import kernels

    calls: list[tuple] = []
    monkeypatch.setattr(kernels, "load_kernels", lambda *args, **kw: calls.append((args, kw)))
    vllm_plugin.register()
    config = VllmConfig()
    layer_args = {
        "layers.0.attn": {},
        "layers.1.attn": {"per_layer_sliding_window": 128, "sinks": make_attention_sink(H)},
        "layers.2.attn": {},
        "layers.3.attn": {"per_layer_sliding_window": 128, "sinks": make_attention_sink(H)},
        "layers.4.attn": {"per_layer_sliding_window": 4096, "logits_soft_cap": 30.0},
    }
    with set_current_vllm_config(config):
        for name, kwargs in layer_args.items():
            Attention(H, D, 0.125, HKV, prefix=name, attn_backend=SparseKBackend, **kwargs)
    spec = FullAttentionSpec(block_size=32, num_kv_heads=HKV, head_size=D, dtype=torch.bfloat16)
    cuda = torch.device("cuda", 0)  # a key only: load_kernels is recorded, not run
    SparseKMetadataBuilder(spec, list(layer_args), config, cuda)
    args = (cuda, D, torch.bfloat16, 32)
    plain = {"cache_dtype": None}  # the cache has the model's dtype
    assert calls == [
        (args, {"window_size": (-1, -1), "softcap": 0.0, "has_sinks": False, **plain}),
        (args, {"window_size": (127, 0), "softcap": 0.0, "has_sinks": True, **plain}),
        (args, {"window_size": (4095, 0), "softcap": 30.0, "has_sinks": False, **plain}),
    ]
    calls.clear()
    window_spec = SlidingWindowSpec(
        block_size=16, num_kv_heads=HKV, head_size=D, dtype=torch.float16, sliding_window=64
    )
    SparseKMetadataBuilder(window_spec, ["not.a.layer"], config, cuda)
    SparseKMetadataBuilder(spec, ["not.a.layer"], config, cuda)
    fallback = {"softcap": 0.0, "has_sinks": False, **plain}
    assert calls == [
        ((cuda, D, torch.float16, 16), {"window_size": (63, 0), **fallback}),
        (args, {"window_size": (-1, -1), **fallback}),
    ]


# ---------------------------------------------------------------------------- a step


def vllm_layer_caches(num_blocks: int, layout: KVCacheLayout):
    """Two layers' caches as vLLM allocates them (one int8 buffer, per-layer views)."""
    spec = FullAttentionSpec(block_size=BLOCK, num_kv_heads=HKV, head_size=D, dtype=torch.float16)
    tensor = _tensor_of(layout, num_blocks)
    raw = torch.randint(-100, 100, (tensor.size,), dtype=torch.int8)
    return spec, raw, create_kv_cache_views(raw, spec, num_blocks, layout, tensor)


def reference(q, k, v, scale: float, *, sliding_window=None, soft_cap=0.0, sinks=None):
    """float64 attention of one sequence's new queries q (n, H, D) over all its tokens k/v
    (L, Hkv, D), with a layer's mask as vLLM defines it (written out here, not converted
    to sparsek's arguments): the query at position p (the last n of the L) sees position
    j iff j <= p and, with a sliding window, p - j < sliding_window (the window counts
    the query itself); scores s become soft_cap * tanh(s / soft_cap); sinks[h] joins the
    softmax denominator of head h."""
    n, length = q.shape[0], k.shape[0]
    kk, vv = (t.double().repeat_interleave(H // HKV, dim=1) for t in (k, v))
    scores = torch.einsum("qhd,khd->hqk", q.double(), kk) * scale
    if soft_cap:
        scores = soft_cap * torch.tanh(scores / soft_cap)
    position = torch.arange(n).view(-1, 1) + (length - n)
    key = torch.arange(length).view(1, -1)
    visible = key <= position
    if sliding_window is not None:
        visible &= position - key < sliding_window
    scores = scores.masked_fill(~visible, -math.inf)
    if sinks is not None:  # one more logit per row, with no value
        scores = torch.cat([scores, sinks.double().view(-1, 1, 1).expand(-1, n, 1)], dim=-1)
    probs = scores.softmax(-1)[..., :length]
    return torch.einsum("hqk,khd->qhd", probs, vv)


@pytest.mark.parametrize("layout", [KVCacheLayout.LBNHC, KVCacheLayout.BLHNC])
def test_builder_cache_update_and_forward_match_dense_attention(layout: KVCacheLayout) -> None:
    """A step mixing decodes, a chunked prefill and a prefill over shuffled blocks: the
    builder's metadata, do_kv_cache_update (with CUDA-graph padding slots), forward."""
    torch.manual_seed(0)
    num_blocks = 24
    spec, raw, (_, kv_cache) = vllm_layer_caches(num_blocks, layout)
    contexts, new = [37, 0, 20, 64, 3], [1, 11, 6, 1, 1]  # decode, prefill, chunk, decodes
    lens = [c + n for c, n in zip(contexts, new, strict=True)]
    table = block_table(lens, num_blocks, 6)
    ks = [torch.randn(n, HKV, D).half() for n in lens]
    vs = [torch.randn(n, HKV, D).half() for n in lens]
    impl = SparseKImpl(H, D, 1 / math.sqrt(D), HKV)

    def slot(b: int, t: int) -> int:
        return int(table[b, t // BLOCK]) * BLOCK + t % BLOCK

    # Earlier steps' tokens, then this step's, as vLLM's cache-update op writes them.
    old = [(b, t) for b, c in enumerate(contexts) for t in range(c)]
    impl.do_kv_cache_update(
        None,
        torch.stack([ks[b][t] for b, t in old]),
        torch.stack([vs[b][t] for b, t in old]),
        kv_cache,
        torch.tensor([slot(b, t) for b, t in old]),
    )
    before = raw.clone()
    step = [
        (b, t) for b, (c, n) in enumerate(zip(contexts, new, strict=True)) for t in range(c, c + n)
    ]
    pad = 3  # padded token rows: garbage, slot -1
    key = torch.cat(
        [torch.stack([ks[b][t] for b, t in step]), torch.full((pad, HKV, D), 9.0).half()]
    )
    value = torch.cat(
        [torch.stack([vs[b][t] for b, t in step]), torch.full((pad, HKV, D), 9.0).half()]
    )
    slot_mapping = torch.tensor([slot(b, t) for b, t in step] + [-1] * pad)
    impl.do_kv_cache_update(None, key, value, kv_cache, slot_mapping)

    # Bytes: exactly the step's rows at their slots; other layer, null block, rest unchanged.
    want_raw = before.clone()
    want = create_kv_cache_views(
        want_raw, spec, num_blocks, layout, _tensor_of(layout, num_blocks)
    )[1]
    for b, t in step:
        s = slot(b, t)
        want[s // BLOCK, :, s % BLOCK, :D] = ks[b][t]
        want[s // BLOCK, :, s % BLOCK, D:] = vs[b][t]
    assert torch.equal(raw, want_raw)

    common = common_metadata(new, lens, table, slot_mapping)
    builder = SparseKMetadataBuilder(spec, ["layers.1.attn"], None, torch.device("cpu"))
    metadata = builder.build(0, common)
    assert metadata.block_table is table and metadata.seq_lens is common.seq_lens  # no copies

    qs = [torch.randn(n, H, D).half() for n in new]
    query = torch.cat([torch.cat(qs), torch.randn(pad, H, D).half()])
    output = torch.full((sum(new) + pad, H, D), float("nan"), dtype=torch.float16)
    result = impl.forward(None, query, key, value, kv_cache, metadata, output)
    assert result is output
    want_out = torch.cat(
        [reference(q, k, v, impl.scale) for q, k, v in zip(qs, ks, vs, strict=True)]
    )
    torch.testing.assert_close(output[: sum(new)].double(), want_out, atol=2e-3, rtol=2e-3)
    assert output[sum(new) :].isnan().all(), "padding rows must not be written"


# id: (sliding_window, logits_soft_cap, sinks): each on its own, a window of one token,
# and all three together (gpt-oss layers have a window and sinks).
MASKED_LAYERS = {
    "window16": (16, None, None),
    "window1": (1, None, None),
    "softcap": (None, 2.0, None),
    "sinks": (None, None, [-1.0, 0.5, 1.5, 3.0]),
    "window16-softcap-sinks": (16, 2.0, [-1.0, 0.5, 1.5, 3.0]),
}
# id: (tokens cached before the step, new tokens) per sequence.
BATCHES = {
    # decodes, a prefill, chunked prefills (one of 17 tokens, longer than the window)
    "mixed": ([37, 0, 20, 64, 3, 50], [1, 11, 6, 1, 1, 17]),
    "decode": ([37, 15, 64, 3, 80, 16], [1, 1, 1, 1, 1, 1]),  # a FULL-graph batch
}


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("layer", MASKED_LAYERS)
def test_layers_with_window_softcap_and_sinks_match_vllms_definition(layer, batch) -> None:
    """A layer built with vLLM's mask arguments (sinks: a bfloat16 parameter, filled after
    the layer is built, as vLLM loads a checkpoint), a step over a cache where, for a
    windowed layer, the blocks no query of the step can see point at vLLM's null block
    (as its sliding-window manager leaves them: block 0, zeros), against float64
    attention with vLLM's definition of the mask; the comparison tells a window one
    token wider or narrower apart."""
    sliding_window, soft_cap, sink_values = MASKED_LAYERS[layer]
    contexts, new = BATCHES[batch]
    torch.manual_seed(1)
    num_blocks = 40
    spec, _, (_, kv_cache) = vllm_layer_caches(num_blocks, KVCacheLayout.LBNHC)
    kv_cache[0].zero_()  # vLLM allocates caches zeroed; the null block is never written
    lens = [c + n for c, n in zip(contexts, new, strict=True)]
    table = block_table(lens, num_blocks, 7)
    ks = [torch.randn(n, HKV, D).half() for n in lens]
    vs = [torch.randn(n, HKV, D).half() for n in lens]
    sinks = None
    if sink_values is not None:
        sinks = torch.nn.Parameter(torch.full((H,), -math.inf, dtype=torch.bfloat16), False)
    impl = SparseKImpl(
        H, D, 1 / math.sqrt(D), HKV, sliding_window=sliding_window,
        logits_soft_cap=soft_cap, sinks=sinks,
    )  # fmt: skip
    if sinks is not None:
        sinks.data.copy_(torch.tensor(sink_values))
        impl.process_weights_after_loading(torch.float16)

    def slot(b: int, t: int) -> int:
        return int(table[b, t // BLOCK]) * BLOCK + t % BLOCK

    tokens = [(b, t) for b, length in enumerate(lens) for t in range(length)]
    impl.do_kv_cache_update(
        None,
        torch.stack([ks[b][t] for b, t in tokens]),
        torch.stack([vs[b][t] for b, t in tokens]),
        kv_cache,
        torch.tensor([slot(b, t) for b, t in tokens]),
    )
    if sliding_window is not None:
        # The first query of sequence b (position contexts[b]) sees contexts[b] -
        # sliding_window + 1 onwards: vLLM frees the whole blocks before that.
        for b, context in enumerate(contexts):
            table[b, : max(0, context - sliding_window + 1) // BLOCK] = 0

    pad = 2
    common = common_metadata(
        new, lens, table, torch.tensor([slot(b, t) for b, t in tokens[-sum(new) :]] + [-1] * pad)
    )
    metadata = SparseKMetadataBuilder(spec, ["layers.1.attn"], None, torch.device("cpu")).build(
        0, common
    )
    qs = [torch.randn(n, H, D).half() for n in new]
    query = torch.cat([torch.cat(qs), torch.randn(pad, H, D).half()])
    output = torch.full((sum(new) + pad, H, D), float("nan"), dtype=torch.float16)
    impl.forward(None, query, query, query, kv_cache, metadata, output)

    sink_logits = None if sink_values is None else torch.tensor(sink_values)

    def want(window: int | None):
        mask = dict(sliding_window=window, soft_cap=soft_cap, sinks=sink_logits)
        return torch.cat(
            [reference(q, k, v, impl.scale, **mask) for q, k, v in zip(qs, ks, vs, strict=True)]
        )

    got = output[: sum(new)].double()
    torch.testing.assert_close(got, want(sliding_window), atol=2e-3, rtol=2e-3)
    assert output[sum(new) :].isnan().all(), "padding rows must not be written"
    if sliding_window is not None:
        for off_by_one in (sliding_window - 1, sliding_window + 1):
            if off_by_one >= 1:
                assert (got - want(off_by_one)).abs().max() > 0.02, off_by_one


def test_fp8_cache_update_and_forward_match_dense_attention() -> None:
    """vLLM's kv_cache_dtype="fp8" on the uint8 cache vLLM allocates for it:
    do_kv_cache_update stores E4M3 of each key / layer._k_scale and value /
    layer._v_scale (vLLM's 0-dim float32 buffers), and forward, with the same scales as
    descales, matches float64 attention over the dequantized keys and values (E4M3 value
    x scale) for a step mixing decodes, a chunked prefill and a prefill."""
    torch.manual_seed(1)
    num_blocks = 24
    spec = FullAttentionSpec(block_size=BLOCK, num_kv_heads=HKV, head_size=D, dtype=torch.uint8)
    tensor = _tensor_of(KVCacheLayout.LBNHC, num_blocks, element_size=1)
    raw = torch.zeros(tensor.size, dtype=torch.int8)
    kv_cache = create_kv_cache_views(raw, spec, num_blocks, KVCacheLayout.LBNHC, tensor)[1]
    assert kv_cache.dtype == torch.uint8
    impl = SparseKImpl(H, D, 1 / math.sqrt(D), HKV, kv_cache_dtype="fp8")
    layer = SimpleNamespace(_k_scale=torch.tensor(0.02), _v_scale=torch.tensor(0.03))
    contexts, new = [37, 0, 20, 64, 3], [1, 11, 6, 1, 1]
    lens = [c + n for c, n in zip(contexts, new, strict=True)]
    table = block_table(lens, num_blocks, 6)
    ks = [torch.randn(n, HKV, D).half() for n in lens]
    vs = [torch.randn(n, HKV, D).half() for n in lens]

    def slot(b: int, t: int) -> int:
        return int(table[b, t // BLOCK]) * BLOCK + t % BLOCK

    tokens = [(b, t) for b, length in enumerate(lens) for t in range(length)]
    slot_mapping = torch.tensor([slot(b, t) for b, t in tokens])
    key = torch.stack([ks[b][t] for b, t in tokens])
    value = torch.stack([vs[b][t] for b, t in tokens])
    impl.do_kv_cache_update(layer, key, value, kv_cache, slot_mapping)
    k8, v8 = (t.view(torch.float8_e4m3fn) for t in (kv_cache[..., :D], kv_cache[..., D:]))
    for (b, t), s in zip(tokens, slot_mapping.tolist(), strict=True):
        assert torch.equal(k8[s // BLOCK, :, s % BLOCK].view(torch.uint8),
                           fp8.quantize(ks[b][t], layer._k_scale).view(torch.uint8))  # fmt: skip
        assert torch.equal(v8[s // BLOCK, :, s % BLOCK].view(torch.uint8),
                           fp8.quantize(vs[b][t], layer._v_scale).view(torch.uint8))  # fmt: skip

    common = common_metadata(new, lens, table, slot_mapping[-sum(new) :])
    metadata = SparseKMetadataBuilder(spec, ["layers.1.attn"], None, torch.device("cpu")).build(
        0, common
    )
    qs = [torch.randn(n, H, D).half() for n in new]
    output = torch.full((sum(new), H, D), float("nan"), dtype=torch.float16)
    query = torch.cat(qs)
    impl.forward(layer, query, query, query, kv_cache, metadata, output)
    exact = [
        [fp8.quantize(t, scale).double() * scale.double() for t in ts]
        for ts, scale in ((ks, layer._k_scale), (vs, layer._v_scale))
    ]
    want = torch.cat([reference(q, k, v, impl.scale) for q, k, v in zip(qs, *exact, strict=True)])
    torch.testing.assert_close(output.double(), want, atol=2e-3, rtol=2e-3)


def test_an_fp8_cache_groups_kernels_take_the_models_dtype() -> None:
    """vLLM's spec of an FP8 cache says uint8 (its allocation): the builder loads the
    kernels of the model's dtype over a float8_e4m3fn cache."""
    from sparsek.integrations.vllm.backend import group_dtypes

    config = SimpleNamespace(model_config=SimpleNamespace(dtype=torch.bfloat16))
    fp8_spec = FullAttentionSpec(block_size=16, num_kv_heads=HKV, head_size=D, dtype=torch.uint8)
    plain = FullAttentionSpec(block_size=16, num_kv_heads=HKV, head_size=D, dtype=torch.float16)
    assert group_dtypes(fp8_spec, config) == (torch.bfloat16, torch.float8_e4m3fn)
    assert group_dtypes(plain, config) == (torch.float16, None)


def block_table(lens: list[int], num_blocks: int, width: int) -> torch.Tensor:
    """(len(lens), width) int32: each sequence's blocks, shuffled, never block 0 (vLLM's
    null block); entries past a sequence's blocks are 0."""
    blocks = (torch.randperm(num_blocks - 1) + 1).tolist()
    table = torch.zeros(len(lens), width, dtype=torch.int32)
    for b, length in enumerate(lens):
        for i in range(-(-length // BLOCK)):
            table[b, i] = blocks.pop()
    return table


def common_metadata(
    new: list[int], lens: list[int], table, slot_mapping
) -> CommonAttentionMetadata:
    """vLLM's metadata of a step: `new` tokens per sequence of `lens` cached tokens (the
    new ones included), over `table`, writing `slot_mapping`."""
    query_start_loc = torch.tensor([0, *torch.tensor(new).cumsum(0).tolist()], dtype=torch.int32)
    return CommonAttentionMetadata(
        query_start_loc=query_start_loc,
        query_start_loc_cpu=query_start_loc.clone(),
        seq_lens=torch.tensor(lens, dtype=torch.int32),
        num_reqs=len(lens),
        num_actual_tokens=sum(new),
        max_query_len=max(new),
        max_seq_len=max(lens),
        block_table_tensor=table,
        slot_mapping=slot_mapping,
    )


def _tensor_of(layout: KVCacheLayout, num_blocks: int, element_size: int = 2) -> KVCacheTensor:
    """vLLM's placement of two layers: layer-outermost (L...) or block-outermost (B...)."""
    page = BLOCK * HKV * 2 * D * element_size
    compact = layout in (KVCacheLayout.LBNHC, KVCacheLayout.LBHNC)
    return KVCacheTensor(
        size=2 * num_blocks * page,
        layers=["layers.0.attn", "layers.1.attn"],
        layer_stride=num_blocks * page if compact else page,
        block_stride=page if compact else 2 * page,
    )


def test_profiling_run_without_metadata_zeroes_the_output() -> None:
    impl = SparseKImpl(H, D, 0.125, HKV)
    output = torch.full((5, H, D), float("nan"), dtype=torch.float16)
    q = torch.randn(5, H, D).half()
    assert impl.forward(None, q, q, q, torch.empty(0), None, output) is output
    assert (output == 0).all()


def test_fused_output_quantization_is_refused() -> None:
    impl = SparseKImpl(H, D, 0.125, HKV)
    q = torch.randn(1, H, D).half()
    with pytest.raises(NotImplementedError, match="output quantization"):
        impl.forward(None, q, q, q, torch.empty(0), None, q.clone(), output_scale=torch.ones(1))
