"""Why did `subclone` (rescale auto) lose to `select` on a tiny GPT-2? Shrink fresh tiny models 0.5x both ways.

    python benchmarks/explore_subclone.py --seeds 101,102,103 --work /tmp/explore-subclone

Per seed: a tiny model (GPT-2: 2 layers, width 64, 4 heads; or the Llama twin with --family llama) trained for
`--steps` steps (AdamW at `--lr`, make_defaults.train) on the stdlib train split with a byte-level BPE tokenizer of `--vocab` tokens (trained here), then
`growkit.shrink --width 0.5x` with subclone (default rescale auto; calibration text: the first `--calibration-bytes`
of the train split) and with select, and each fixed rescale candidate. Reported: validation loss right after
shrinking (make_defaults.evaluate: the first 64 blocks of 128 tokens of the val split), and for auto each
candidate's held-out calibration loss (what auto chose by) beside its validation loss. Not a benchmark of record:
the investigation behind the subclone fixes (benchmarks/RESULTS.md).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
from make_defaults import encode, evaluate, train, train_tokenizer  # noqa: E402

import growkit  # noqa: E402
from growkit.train.data import stdlib_text  # noqa: E402


def tiny_model(family: str, vocab: int, tok) -> torch.nn.Module:
    ids = dict(vocab_size=vocab, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
               pad_token_id=tok.pad_token_id)
    if family == "gpt2":
        return GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=256, resid_pdrop=0.0,
                                          embd_pdrop=0.0, attn_pdrop=0.0, **ids))
    return LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                        tie_word_embeddings=True, **ids))


def val_loss(path: Path, val_ids: torch.Tensor) -> float:
    return evaluate(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), val_ids)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/explore-subclone"))
    ap.add_argument("--family", choices=("gpt2", "llama"), default="gpt2")
    ap.add_argument("--seeds", default="101,102,103")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--vocab", type=int, default=512)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--width", default="0.5x")
    ap.add_argument("--calibration-bytes", type=int, default=100_000)
    ap.add_argument("--candidates", action="store_true", help="also shrink with every fixed rescale candidate")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    t0 = time.time()
    args.work.mkdir(parents=True, exist_ok=True)
    tok_dir = args.work / f"tokenizer-{args.vocab}"
    if (tok_dir / "tokenizer.json").exists():
        from transformers import PreTrainedTokenizerFast
        tok = PreTrainedTokenizerFast.from_pretrained(tok_dir)
    else:
        tok = train_tokenizer(tok_dir, args.vocab)
    train_ids, val_ids = encode(tok, "train"), encode(tok, "val")
    calib = args.work / "calibration.txt"
    calib.write_text(stdlib_text("train", max_bytes=args.calibration_bytes), encoding="utf-8")

    results: dict = {"args": {k: str(v) for k, v in vars(args).items()}, "seeds": {}}
    for seed in [int(s) for s in args.seeds.split(",")]:
        src = args.work / f"{args.family}-{args.vocab}-{args.steps}-{args.lr:g}-{seed}"
        if (src / "model.safetensors").exists():  # trained by an earlier run with the same settings
            source_loss = val_loss(src, val_ids)
        else:
            torch.manual_seed(seed)
            model = tiny_model(args.family, len(tok), tok)
            source_loss = train(model, train_ids, val_ids, args.steps, args.lr, seed)
            model.save_pretrained(src)
            tok.save_pretrained(src)
        row: dict = {"source": source_loss}
        out = args.work / "shrunk"
        done = growkit.shrink(src, out, width=args.width, method="subclone", calibration=[calib], seed=seed,
                              quiet=True, overwrite=True)
        options = done.provenance["options"]
        row["subclone auto"] = {"val": val_loss(out, val_ids), "chosen": options.get("rescale_chosen"),
                                "heldout": options.get("rescale_losses")}
        growkit.shrink(src, out, width=args.width, method="select", seed=seed, quiet=True, overwrite=True)
        row["select"] = {"val": val_loss(out, val_ids)}
        if args.candidates:
            for mode in options.get("rescale_losses") or {}:
                growkit.shrink(src, out, width=args.width, method="subclone", calibration=[calib], rescale=mode,
                               seed=seed, quiet=True, overwrite=True)
                row[f"subclone {mode}"] = {"val": val_loss(out, val_ids),
                                           "heldout": options["rescale_losses"][mode]}
        shutil.rmtree(out)
        results["seeds"][seed] = row
        print(f"seed {seed}: source {source_loss:.4f}; " + "; ".join(
            f"{k} {v['val']:.4f}" + (f" ({v['chosen']})" if v.get("chosen") else "")
            for k, v in row.items() if isinstance(v, dict)), flush=True)
    results["seconds"] = round(time.time() - t0)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
