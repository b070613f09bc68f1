"""Small real GGUF files written with the `gguf` package's own writer, from tiny `transformers` Llama models.

The layout follows llama.cpp's conversion of a Llama checkpoint: GGUF tensor names, q/k rows reordered from the
Hugging Face rotary layout (halves) to llama.cpp's (interleaved pairs), metadata under `llama.*`, and a byte-level
BPE tokenizer under `tokenizer.ggml.*`. `expected_state` gives the Hugging Face weights such a file stands for
(after its quantization round trip), so a test can compare growing the GGUF with growing the same safetensors.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import torch
import transformers as T

from conftest import randomize

#: Hugging Face name template -> GGUF name template, for the Llama tensors.
NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
    "model.layers.{}.input_layernorm.weight": "blk.{}.attn_norm.weight",
    "model.layers.{}.self_attn.q_proj.weight": "blk.{}.attn_q.weight",
    "model.layers.{}.self_attn.k_proj.weight": "blk.{}.attn_k.weight",
    "model.layers.{}.self_attn.v_proj.weight": "blk.{}.attn_v.weight",
    "model.layers.{}.self_attn.o_proj.weight": "blk.{}.attn_output.weight",
    "model.layers.{}.post_attention_layernorm.weight": "blk.{}.ffn_norm.weight",
    "model.layers.{}.mlp.gate_proj.weight": "blk.{}.ffn_gate.weight",
    "model.layers.{}.mlp.up_proj.weight": "blk.{}.ffn_up.weight",
    "model.layers.{}.mlp.down_proj.weight": "blk.{}.ffn_down.weight",
}


def byte_tokens() -> list[str]:
    """GPT-2's byte-level alphabet: one printable character per byte value."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1))
    extra = [b for b in range(256) if b not in printable]
    chars = {b: chr(b) for b in printable} | {b: chr(256 + i) for i, b in enumerate(extra)}
    return [chars[b] for b in range(256)]


TOKENS = ["<|endoftext|>", *byte_tokens(), "Ġt", "Ġa", "in", "he"]
MERGES = ["Ġ t", "Ġ a", "i n", "h e"]


def tiny_llama(tied: bool, seed: int = 0) -> T.LlamaForCausalLM:
    """Rows of 32 or 64 entries, so every matrix quantizes in whole 32-entry blocks."""
    config = T.LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=len(TOKENS), max_position_embeddings=128,
                           tie_word_embeddings=tied, bos_token_id=0, eos_token_id=0, rms_norm_eps=1e-5)
    torch.manual_seed(seed)
    return randomize(T.LlamaForCausalLM(config), seed).eval()


def to_llama_cpp_rows(w: np.ndarray, heads: int) -> np.ndarray:
    """Within each head, rows (first half, second half) -> interleaved pairs, the rotary layout llama.cpp uses."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _stored(w: np.ndarray, qtype: str) -> tuple[np.ndarray, np.ndarray]:
    """(what the writer stores, what reading it back gives) for one tensor; norms stay F32 as in llama.cpp."""
    if w.ndim == 1 or qtype == "F32":
        return w, w
    if qtype == "F16":
        return w.astype(np.float16), w.astype(np.float16).astype(np.float32)
    kind = gguf.GGMLQuantizationType[qtype]
    q = gguf.quants.quantize(w, kind)
    return q, gguf.quants.dequantize(q, kind)


def _hf_names(model: T.LlamaForCausalLM) -> list[tuple[str, str, str]]:
    out = []
    for name in model.state_dict():
        if name == "lm_head.weight" and model.config.tie_word_embeddings:
            continue
        parts = name.split(".")
        template = ".".join(p if not p.isdigit() else "{}" for p in parts)
        layer = next((p for p in parts if p.isdigit()), "")
        out.append((name, template, layer))
    return out


def write_llama_gguf(model: T.LlamaForCausalLM, path: Path, qtype: str = "F32", architecture: str = "llama",
                     tokenizer: bool = True, drop: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """Write `model` as a GGUF file (matrices stored as `qtype`: F32, F16, Q8_0, Q4_1, ...; the Hugging Face
    tensors named in `drop` left out) and return the Hugging Face state dict the file stands for."""
    cfg = model.config
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_name("tiny llama")
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    writer.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    if tokenizer:
        writer.add_tokenizer_model("gpt2")
        writer.add_token_list(TOKENS)
        writer.add_token_types([gguf.TokenType.CONTROL] + [gguf.TokenType.NORMAL] * (len(TOKENS) - 1))
        writer.add_token_merges(MERGES)
        writer.add_bos_token_id(0)
        writer.add_eos_token_id(0)
    expected: dict[str, torch.Tensor] = {}
    for name, template, layer in _hf_names(model):
        if name in drop:
            continue
        w = model.state_dict()[name].detach().numpy().astype(np.float32)
        rows = {"q_proj": cfg.num_attention_heads, "k_proj": cfg.num_key_value_heads}
        heads = next((h for key, h in rows.items() if key in name), None)
        file_w = to_llama_cpp_rows(w, heads) if heads else w
        data, back = _stored(file_w, qtype)
        if heads:  # reading undoes the row reordering; quantization blocks run along rows, so the two commute
            back = back.reshape(heads, back.shape[0] // heads // 2, 2, *back.shape[1:]).swapaxes(1, 2).reshape(
                back.shape)
        raw = None if data.dtype != np.uint8 else gguf.GGMLQuantizationType[qtype]
        writer.add_tensor(NAMES[template].format(layer), data, raw_dtype=raw)
        expected[name] = torch.from_numpy(np.ascontiguousarray(back, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return expected
