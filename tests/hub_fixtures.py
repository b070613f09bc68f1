"""Fixtures of the hub and recipe tests, imported by those modules (conftest.py stays the core's).

Tiny real checkpoints written with save_pretrained, with tokenizers (no downloads), and a local Hub.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from localhub import PROXY_VARS, READ_TOKEN, TOKEN, LocalHub


def _tiny_tokenizer():
    """A byte-level BPE trained in-process on a few lines of Python, saved as HF PreTrainedTokenizerFast files."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    text = Path(__file__).read_text(encoding="utf-8")
    tok.train_from_iterator([text] * 4, trainer=trainer)
    eos = "<|endoftext|>"
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=eos, eos_token=eos, unk_token=eos, pad_token=eos)


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory) -> Path:
    """A 2-layer GPT-2 (hidden 32, 4 heads) with random weights, tokenizer files and a license in its README."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    tok = _tiny_tokenizer()
    cfg = GPT2Config(vocab_size=len(tok), n_positions=64, n_embd=32, n_layer=2, n_head=4,
                     bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)
    out = tmp_path_factory.mktemp("tiny-gpt2")
    GPT2LMHeadModel(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    (out / "README.md").write_text("---\nlicense: apache-2.0\n---\n# tiny source\n", encoding="utf-8")
    return out


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    """A 2-layer Llama (hidden 32, 4 q / 2 kv heads), sharded into several safetensors files with an index."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1)
    tok = _tiny_tokenizer()
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)
    out = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(cfg).save_pretrained(out, max_shard_size="20KB")
    tok.save_pretrained(out)
    return out


# --- a local Hub (tests/localhub.py) and an environment that cannot leak a real token or reach the network ---


@pytest.fixture
def hub_env(monkeypatch, tmp_path):
    """No token from the developer's machine, Xet off (the local server speaks LFS), no proxy for 127.0.0.1."""
    from huggingface_hub import constants
    from huggingface_hub.utils import close_session

    for var in ("HF_TOKEN", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_ENDPOINT", *PROXY_VARS):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    # huggingface_hub reads these at import time; the env above covers subprocesses, these cover this process.
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "hf_home" / "token"))
    close_session()  # a fresh HTTP client that sees the proxy settings above
    yield tmp_path
    close_session()


@pytest.fixture
def hub(hub_env):
    with LocalHub(tokens={TOKEN: "write", READ_TOKEN: "read"}) as server:
        yield server
