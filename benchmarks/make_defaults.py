"""Build the bundled defaults: a byte-level BPE tokenizer and two tiny models trained on the Python stdlib source.

    python benchmarks/make_defaults.py            # writes models/tokenizer, models/tiny-gpt2, models/tiny-llama

Deterministic: fixed seeds, sorted files, a hash-based train/val split (growkit.train.data), single-process CPU
training with a seeded batch sampler. Takes ~3 minutes on 2 CPU cores. The final validation losses are printed
and written to models/README.md together with this command.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from growkit.train.data import iter_stdlib_texts, stdlib_text  # noqa: E402

EOS = "<|endoftext|>"
VOCAB = 2048
SEQ = 128
BATCH = 16


def train_tokenizer(out: Path, vocab: int = VOCAB) -> PreTrainedTokenizerFast:
    """Byte-level BPE (GPT-2 style pre-tokenizer), so any byte string round-trips."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(iter_stdlib_texts("train"), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOS, eos_token=EOS, unk_token=EOS, pad_token=EOS)
    fast.model_max_length = 256
    out.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out)
    return fast


def encode(tok: PreTrainedTokenizerFast, split: str) -> torch.Tensor:
    """All files of a split as one long id stream, each file followed by EOS."""
    ids: list[int] = []
    texts = list(iter_stdlib_texts(split))
    for enc in tok(texts, add_special_tokens=False)["input_ids"]:
        ids.extend(enc)
        ids.append(tok.eos_token_id)
    return torch.tensor(ids, dtype=torch.long)


def evaluate(model: torch.nn.Module, val: torch.Tensor, max_blocks: int = 64) -> float:
    """Mean next-token loss over the first `max_blocks` non-overlapping val blocks (fixed, so comparable)."""
    n = min(max_blocks, (len(val) - 1) // SEQ)
    blocks = val[: n * SEQ].view(n, SEQ)
    model.eval()
    losses = []
    with torch.no_grad():
        for i in range(0, n, BATCH):
            x = blocks[i : i + BATCH]
            losses.append(model(input_ids=x, labels=x).loss.item() * len(x))
    model.train()
    return sum(losses) / n


def train(model: torch.nn.Module, train_ids: torch.Tensor, val: torch.Tensor, steps: int, lr: float, seed: int) -> float:
    """AdamW, linear warm-up then cosine decay, random contiguous blocks drawn with a seeded generator."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, steps - warm)))
    )
    t0 = time.time()
    model.train()
    for step in range(steps):
        starts = torch.randint(0, len(train_ids) - SEQ - 1, (BATCH,), generator=gen)
        x = torch.stack([train_ids[s : s + SEQ] for s in starts.tolist()])
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % 200 == 0 or step == steps - 1:
            print(f"  step {step:5d}  loss {loss.item():.4f}  {time.time() - t0:6.1f}s", flush=True)
    return evaluate(model, val)


def save(model: torch.nn.Module, tok: PreTrainedTokenizerFast, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    model.to(torch.float32).save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=REPO / "models")
    ap.add_argument("--steps", type=int, default=2000, help="optimizer steps per model")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(2)
    torch.use_deterministic_algorithms(True)

    t0 = time.time()
    tok = train_tokenizer(args.out / "tokenizer")
    train_ids, val_ids = encode(tok, "train"), encode(tok, "val")
    bytes_per_token = len(stdlib_text("val").encode()) / len(val_ids)
    print(f"tokenizer: vocab {len(tok)}, train {len(train_ids)} tokens, val {len(val_ids)} tokens, "
          f"{bytes_per_token:.2f} bytes/token, {time.time() - t0:.1f}s")

    common = dict(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                  pad_token_id=tok.pad_token_id)
    specs = {
        "tiny-gpt2": (GPT2LMHeadModel, GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=256, n_inner=256,
                                                   tie_word_embeddings=True, resid_pdrop=0.0, embd_pdrop=0.0,
                                                   attn_pdrop=0.0, **common), 3e-3),
        "tiny-llama": (LlamaForCausalLM, LlamaConfig(hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                                                      num_attention_heads=4, num_key_value_heads=2,
                                                      max_position_embeddings=256, tie_word_embeddings=False,
                                                      rms_norm_eps=1e-5, **common), 3e-3),
    }
    results = {}
    for name, (cls, cfg, lr) in specs.items():
        torch.manual_seed(args.seed)
        model = cls(cfg)
        n_params = sum(p.numel() for p in model.parameters())
        init_loss = evaluate(model, val_ids)
        print(f"{name}: {n_params} parameters, val loss at init {init_loss:.4f}")
        t1 = time.time()
        val_loss = train(model, train_ids, val_ids, args.steps, lr, args.seed)
        secs = time.time() - t1
        print(f"{name}: final val loss {val_loss:.4f} ({secs:.0f}s)")
        save(model, tok, args.out / name)
        results[name] = dict(parameters=n_params, val_loss=round(val_loss, 4), init_val_loss=round(init_loss, 4),
                             steps=args.steps, lr=lr, train_seconds=round(secs, 1))

    (args.out / "defaults.json").write_text(json.dumps(
        dict(seed=args.seed, seq_len=SEQ, batch_size=BATCH, tokens_per_step=SEQ * BATCH, vocab=len(tok),
             val_tokens_evaluated=min(64, (len(val_ids) - 1) // SEQ) * SEQ, bytes_per_token=round(bytes_per_token, 3),
             torch=torch.__version__, python=platform.python_version(), models=results), indent=2) + "\n")
    rows = "\n".join(f"| {k} | {v['parameters']:,} | {v['steps']} | {v['lr']} | {v['init_val_loss']:.4f} | "
                     f"{v['val_loss']:.4f} | {v['train_seconds']:.0f} |" for k, v in results.items())
    (args.out / "README.md").write_text(f"""# Bundled default models

Made by `python benchmarks/make_defaults.py --steps {args.steps} --seed {args.seed}` (CPU, 2 threads, ~{time.time() - t0:.0f} s in all).

- `tokenizer/`: byte-level BPE, vocab {len(tok)}, trained on the Python {platform.python_version()} standard-library
  source (`growkit.train.data`, train split: sorted `*.py` files outside tests/site-packages; 5% of files, chosen by
  path hash, held out for validation). {bytes_per_token:.2f} bytes per token on the validation split.
- `tiny-gpt2/`: GPT-2, n_embd 64, 2 layers, 4 heads, n_inner 256, n_positions 256, tied embeddings, no dropout.
- `tiny-llama/`: Llama, hidden 64, intermediate 176, 2 layers, 4 heads / 2 KV heads (GQA), untied LM head,
  max_position_embeddings 256.

Both fp32 safetensors with the tokenizer files; load with `AutoModelForCausalLM.from_pretrained` /
`AutoTokenizer.from_pretrained`. Training: AdamW (betas 0.9/0.95, wd 0.1), warm-up 5% then cosine to 10%,
batch {BATCH} x {SEQ} tokens, random contiguous blocks from a seeded generator, grad-clip 1.0.
Validation loss: mean next-token cross-entropy (nats/token) on the first {min(64, (len(val_ids) - 1) // SEQ)} blocks of {SEQ} tokens of the val split.

| model | parameters | steps | lr | val loss at init | final val loss | train s |
|---|---|---|---|---|---|---|
{rows}

Numbers depend on the Python version (the stdlib text) and torch build; rerun the command to rebuild.
""")
    print(f"done in {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
