"""Tiny real `transformers` models, saved as real checkpoints, for every family growkit supports."""

from __future__ import annotations

import gc
import os
from pathlib import Path

import pytest

# One OpenMP thread for the suite and the processes it starts, unless whoever runs it sets OMP_NUM_THREADS: the
# models here are tiny, so a second thread only adds overhead, and on a busy machine its idle spinning made the
# same tests several times slower (set before torch is imported, which reads it then).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
import transformers as T  # noqa: E402

MODELS = Path(__file__).resolve().parents[1] / "models"
NO_DROPOUT = dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)


def pytest_runtest_setup(item: pytest.Item) -> None:
    """Before each test, collect the garbage the previous ones left and freeze everything still alive (torch's and
    transformers' modules and registries: hundreds of thousands of objects that live to the end), so that a full
    garbage collection walks only what the test itself makes. `growkit.train` ends with one (accelerate's
    `free_memory`), which otherwise took a third of a second each time."""
    gc.collect()
    gc.freeze()


def tiny_config(name: str) -> T.PretrainedConfig:
    """Configs small enough for milliseconds per forward pass: tied/untied heads, GQA, q/k/v bias, q/k norms, fused
    q/k/v and gate/up projections (Phi-3, with partial rotary and longrope), post-norms (OLMo2, Gemma2/3)."""
    llama = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, vocab_size=101, max_position_embeddings=64)
    neox = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, vocab_size=101, max_position_embeddings=64)
    opt = dict(hidden_size=32, ffn_dim=48, num_hidden_layers=2, vocab_size=101, max_position_embeddings=64,
               dropout=0.0, pad_token_id=1, bos_token_id=2, eos_token_id=2)
    # Sliding window below the verification length, so the re-indexed layer types matter; soft caps within reach.
    gemma2 = dict(llama, sliding_window=8, query_pre_attn_scalar=32, final_logit_softcapping=3.0,
                  attn_logit_softcapping=2.0)
    gemma3 = dict(gemma2, layer_types=["full_attention", "sliding_attention"])  # not the default pattern
    granite = dict(llama, embedding_multiplier=12.0, residual_multiplier=0.22, attention_multiplier=0.25,
                   logits_scaling=8.0)
    phi3 = dict(llama, bos_token_id=0, eos_token_id=0, pad_token_id=0)  # their defaults lie outside a 101 vocab
    return {
        "gpt2": lambda: T.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=101, n_positions=64, bos_token_id=0,
                                     eos_token_id=0, **NO_DROPOUT),
        "gpt2-untied": lambda: T.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=101, n_positions=64,
                                            bos_token_id=0, eos_token_id=0, tie_word_embeddings=False, **NO_DROPOUT),
        "llama-gqa4": lambda: T.LlamaConfig(num_attention_heads=4, num_key_value_heads=1, **llama),
        "llama-mha": lambda: T.LlamaConfig(num_attention_heads=4, num_key_value_heads=4, **llama),
        "llama-tied": lambda: T.LlamaConfig(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                                            **llama),
        "mistral": lambda: T.MistralConfig(num_attention_heads=4, num_key_value_heads=2, **llama),
        "qwen2": lambda: T.Qwen2Config(num_attention_heads=4, num_key_value_heads=2, **llama),
        "qwen3": lambda: T.Qwen3Config(num_attention_heads=4, num_key_value_heads=2, head_dim=8, **llama),
        "qwen3-tied": lambda: T.Qwen3Config(num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                            tie_word_embeddings=True, **llama),
        # parallel residual, rotary on a quarter of head_dim, untied head (Pythia's); sequential, full rotary, tied
        "gpt_neox": lambda: T.GPTNeoXConfig(num_attention_heads=4, rotary_pct=0.25, **neox),
        "gpt_neox-sequential-tied": lambda: T.GPTNeoXConfig(num_attention_heads=4, rotary_pct=1.0,
                                                            use_parallel_residual=False, tie_word_embeddings=True,
                                                            **neox),
        # GQA with a bias on every projection and a tied head (StarCoder2's defaults); untied, one kv head, no biases
        "starcoder2": lambda: T.Starcoder2Config(num_attention_heads=4, num_key_value_heads=2, **llama),
        "starcoder2-untied": lambda: T.Starcoder2Config(num_attention_heads=4, num_key_value_heads=1, use_bias=False,
                                                        tie_word_embeddings=False, **llama),
        # LayerNorm before the blocks, tied; after them, untied; after them, tied, with project_in/out (OPT-350m's)
        "opt": lambda: T.OPTConfig(num_attention_heads=4, **opt),
        "opt-post-ln-untied": lambda: T.OPTConfig(num_attention_heads=4, do_layer_norm_before=False,
                                                  tie_word_embeddings=False, **opt),
        "opt-post-ln-proj": lambda: T.OPTConfig(num_attention_heads=4, do_layer_norm_before=False,
                                                word_embed_proj_dim=24, **opt),
        "opt-post-ln-tied": lambda: T.OPTConfig(num_attention_heads=4, do_layer_norm_before=False, **opt),
        "opt-proj": lambda: T.OPTConfig(num_attention_heads=4, word_embed_proj_dim=24, **opt),
        "opt-no-gains": lambda: T.OPTConfig(num_attention_heads=4, layer_norm_elementwise_affine=False, **opt),
        "gemma": lambda: T.GemmaConfig(num_attention_heads=4, num_key_value_heads=1, head_dim=8, **llama),
        "gemma-untied": lambda: T.GemmaConfig(num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                              tie_word_embeddings=False, **llama),
        "gemma2": lambda: T.Gemma2Config(num_attention_heads=4, num_key_value_heads=2, head_dim=8, **gemma2),
        "gemma3": lambda: T.Gemma3TextConfig(num_attention_heads=4, num_key_value_heads=2, head_dim=8, **gemma3),
        "gemma3-untied": lambda: T.Gemma3TextConfig(num_attention_heads=4, num_key_value_heads=1, head_dim=8,
                                                    tie_word_embeddings=False, **gemma3),
        "granite": lambda: T.GraniteConfig(num_attention_heads=4, num_key_value_heads=2, **granite),
        "granite-tied": lambda: T.GraniteConfig(num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=True,
                                                **granite),
        "phi3": lambda: T.Phi3Config(num_attention_heads=4, num_key_value_heads=2, **phi3),
        "phi3-tied": lambda: T.Phi3Config(num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=True,
                                          rope_parameters=dict(rope_type="longrope", rope_theta=10000.0,
                                                               partial_rotary_factor=0.5, short_factor=[1.0, 1.5],
                                                               long_factor=[2.0, 3.0]),
                                          original_max_position_embeddings=32, **phi3),
        "olmo2": lambda: T.Olmo2Config(num_attention_heads=4, num_key_value_heads=2, **phi3),
        "olmo2-tied": lambda: T.Olmo2Config(num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True,
                                            attention_bias=True, **phi3),
    }[name]()


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Non-trivial norm gains and biases, so that a bug in how growth treats them cannot hide behind ones and zeros."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and name.endswith("weight"):
                p.copy_(torch.rand(p.shape, generator=gen) + 0.5)
            elif p.dim() == 1:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return model


def save_tiny(name: str, path: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    model = randomize(T.AutoModelForCausalLM.from_config(tiny_config(name)), seed)
    model.save_pretrained(path)
    return path


@pytest.fixture
def tiny(tmp_path: Path):
    """Factory: `tiny("llama-gqa4")` -> path of a saved checkpoint directory."""

    def make(name: str, seed: int = 0) -> Path:
        return save_tiny(name, tmp_path / f"src-{name}", seed)

    return make
