"""End to end: vLLM generates with `--attention-backend SPARSEK` what it generates with its
own FLASH_ATTN backend (greedy decoding of a tiny random-weight Llama created locally).

Needs a Hopper GPU *and* vllm 0.33.0 with sparsek installed in the same environment. CI is
CPU-only, and the GPU runs so far used torch 2.11, beside which vLLM 0.33 (it pins torch
2.14) cannot be installed, so this test has NOT been run yet. Where both exist:

    pip install -e ".[vllm]" && pytest -m slow tests/gpu/test_vllm_e2e.py

Compared against: FLASH_ATTN's tokens, with vLLM's own criterion for two backends that
round differently: identical until the first step where they differ, and at that step each
backend's token is among the other's top-5 log-probabilities (later tokens follow from
different prefixes and are not compared). Run eagerly and with CUDA graphs (FULL graphs
for decode batches).
"""

from __future__ import annotations

import gc
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.sm90, pytest.mark.slow]
vllm = pytest.importorskip(
    "vllm",
    reason='needs vllm 0.33.0: pip install ".[vllm]" in a sparsek clone, or '
    '"dist/sparsek-0.2.0-py3-none-any.whl[vllm]" from a built wheel',
)

TOP_K = 5
PROMPT_LENGTHS = (1, 5, 37, 300, 700)  # decode from one token up to a chunk of prefill


def tiny_llama(path: Path) -> None:
    """A 2-layer Llama (GQA 4:2, head_dim 64) with random weights, saved for vLLM."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=256,
        intermediate_size=512,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        num_hidden_layers=2,
        vocab_size=512,
        max_position_embeddings=2048,
        torch_dtype="bfloat16",
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(path)


def generate(model: Path, backend: str, eager: bool):
    from vllm import LLM, SamplingParams

    llm = LLM(
        model=str(model),
        skip_tokenizer_init=True,
        attention_backend=backend,
        enforce_eager=eager,
        dtype="bfloat16",
        max_model_len=1024,
        gpu_memory_utilization=0.3,
        seed=0,
    )
    prompts = [{"prompt_token_ids": [3 + i % 500 for i in range(n)]} for n in PROMPT_LENGTHS]
    params = SamplingParams(temperature=0.0, max_tokens=48, ignore_eos=True, logprobs=TOP_K)
    outputs = [out.outputs[0] for out in llm.generate(prompts, params)]
    del llm
    gc.collect()
    torch.cuda.empty_cache()
    return [(list(o.token_ids), o.logprobs) for o in outputs]


@pytest.mark.parametrize("eager", [True, False], ids=["eager", "cudagraphs"])
def test_greedy_generation_matches_flash_attn(tmp_path: Path, eager: bool) -> None:
    tiny_llama(tmp_path)
    ours = generate(tmp_path, "SPARSEK", eager)
    theirs = generate(tmp_path, "FLASH_ATTN", eager)
    for i, ((tokens, logprobs), (ref_tokens, ref_logprobs)) in enumerate(
        zip(ours, theirs, strict=True)
    ):
        for step, (token, ref) in enumerate(zip(tokens, ref_tokens, strict=True)):
            if token != ref:
                assert token in ref_logprobs[step] and ref in logprobs[step], (
                    f"prompt {i}, step {step}: SPARSEK chose {token}, FLASH_ATTN {ref}, "
                    "and neither is in the other's top-5"
                )
                break
