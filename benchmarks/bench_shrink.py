"""Shrinking benchmark: subclone vs select vs random init of the same size, on held-out stdlib text.

    python benchmarks/bench_shrink.py --threads 1     # ~25 min on one CPU core; prints the tables for RESULTS.md

1. Train a source model per family (GPT-2 and a GQA Llama, d 128, 4 layers) on the stdlib train split.
2. Shrink it with `growkit.shrink`: 0.5x width (d 64, same depth) and 0.5x width with 2 of 4 layers; methods
   subclone (activation importance on calibration text from the *train* split; the default `rescale auto`, which
   keeps the candidate with the lowest loss on held-out calibration tokens, and the fixed modes fanin / norm / none
   for comparison), subclone without calibration (weight-norm importance), select (evenly strided), and random
   initialisation of the same config. For `rescale auto`, every candidate's held-out calibration loss (what auto
   chose by) beside its validation loss (each candidate shrunk with that fixed mode).
3. Validation loss right after shrinking, and after a short training run (same steps, same seeded data order, same
   schedule for every row; two learning rates, because a random init wants a larger one than an inherited one) for
   subclone with calibration (auto and each fixed mode), select and random init.
4. Activation scales right after shrinking (0.5x width only): RMS of the residual stream and of the logits, shrunk
   over source restricted to the kept coordinates; 1.0 = the source's scale.
5. Round trip: shrink 0.5x, then `growkit grow --method clone --width 2x`; loss against the original.

Deterministic: fixed seeds, a fixed thread count (`--threads`), `torch.use_deterministic_algorithms`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast,
)

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
from make_defaults import SEQ, encode, evaluate, train  # noqa: E402

import growkit  # noqa: E402
from growkit.checkpoint.reader import load_checkpoint  # noqa: E402
from growkit.pipeline import plan_growth  # noqa: E402
from growkit.shrink_command import shrink_options  # noqa: E402
from growkit.train.data import stdlib_text  # noqa: E402


def source_config(family: str, tok: PreTrainedTokenizerFast):
    common = dict(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                  pad_token_id=tok.pad_token_id)
    if family == "gpt2":
        return GPT2LMHeadModel, GPT2Config(n_embd=128, n_layer=4, n_head=8, n_positions=256, n_inner=512,
                                           resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **common)
    return LlamaForCausalLM, LlamaConfig(hidden_size=128, intermediate_size=352, num_hidden_layers=4,
                                         num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=256,
                                         tie_word_embeddings=False, **common)


def load(path: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@torch.no_grad()
def scales(source: torch.nn.Module, shrunk: torch.nn.Module, kept: torch.Tensor, tokens: torch.Tensor) -> dict:
    """RMS of shrunk activations over the source's on the kept stream coordinates (1.0 = same scale)."""
    a = source(input_ids=tokens, output_hidden_states=True)
    b = shrunk(input_ids=tokens, output_hidden_states=True)
    ratios = [float(hb.pow(2).mean().sqrt() / ha[..., kept].pow(2).mean().sqrt())
              for ha, hb in zip(a.hidden_states, b.hidden_states)]
    return {"stream": sum(ratios[:-1]) / len(ratios[:-1]), "final_norm": ratios[-1],
            "logits": float(b.logits.std() / a.logits.std())}


def train_copy(path: Path | None, make_random, train_ids, val_ids, steps: int, lr: float, seed: int) -> float:
    model = load(path) if path is not None else make_random()
    model.train()
    return train(model, train_ids, val_ids, steps, lr, seed)


def candidates(src_dir: Path, out: Path, size: dict, calib: Path, val_ids: torch.Tensor, seed: int,
               heldout: dict[str, float]) -> dict[str, dict[str, float]]:
    """Each rescale candidate of `auto`: its held-out calibration loss (as auto recorded it) and its validation loss
    (shrunk again with that fixed mode)."""
    rows = {}
    for mode, loss in heldout.items():
        growkit.shrink(src_dir, out, seed=seed, quiet=True, overwrite=True, method="subclone", calibration=[calib],
                       rescale=mode, **size)
        rows[mode] = {"heldout_calibration_loss": loss, "val_loss": evaluate(load(out), val_ids)}
    shutil.rmtree(out)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/growkit-bench-shrink"))
    ap.add_argument("--families", default="llama,gpt2")
    ap.add_argument("--source-steps", type=int, default=1200)
    ap.add_argument("--steps", type=int, default=300, help="training steps after shrinking")
    ap.add_argument("--lrs", default="1e-3,3e-3")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--calibration-bytes", type=int, default=100_000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, default=None, help="also write the raw results here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    t_start = time.time()
    lrs = [float(x) for x in args.lrs.split(",")]

    work = args.work
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    tok = PreTrainedTokenizerFast.from_pretrained(REPO / "models" / "tokenizer")
    train_ids, val_ids = encode(tok, "train"), encode(tok, "val")
    calib = work / "calibration.txt"
    calib.write_text(stdlib_text("train", max_bytes=args.calibration_bytes), encoding="utf-8")
    probe = val_ids[: 8 * SEQ].view(8, SEQ)
    results: dict = {"args": {k: str(v) for k, v in vars(args).items()}, "families": {}}

    for family in args.families.split(","):
        cls, cfg = source_config(family, tok)
        torch.manual_seed(args.seed)
        model = cls(cfg)
        t0 = time.time()
        src_loss = train(model, train_ids, val_ids, args.source_steps, 3e-3, args.seed)
        src_dir = work / f"src-{family}"
        model.save_pretrained(src_dir)
        tok.save_pretrained(src_dir)
        print(f"[{family}] source val loss {src_loss:.4f} ({time.time() - t0:.0f}s)", flush=True)
        source = load(src_dir)
        fam: dict = {"source": {"val_loss": src_loss, "parameters": sum(p.numel() for p in source.parameters()),
                                "train_seconds": round(time.time() - t0)}, "targets": {}, "round_trip": {}}
        results["families"][family] = fam

        targets = {"0.5x width": dict(width="0.5x"), "0.5x width, 2 of 4 layers": dict(width="0.5x", layers=2)}
        variants = {
            "subclone (default: rescale auto)": dict(method="subclone", calibration=[calib]),
            "subclone, rescale fanin": dict(method="subclone", calibration=[calib], rescale="fanin"),
            "subclone, rescale norm": dict(method="subclone", calibration=[calib], rescale="norm"),
            "subclone, rescale none": dict(method="subclone", calibration=[calib], rescale="none"),
            "subclone, no calibration": dict(method="subclone"),
            "select": dict(method="select"),
        }
        main_row = "subclone (default: rescale auto)"
        # the fixed rescale modes are trained too: is the lowest loss right after shrinking also the best start?
        trained_rows = (main_row, "subclone, rescale fanin", "subclone, rescale norm", "subclone, rescale none",
                        "select", "random init")
        for tname, size in targets.items():
            rows: dict = {}
            first_dir = None
            for vname, opts in variants.items():
                out = work / f"{family}-{'depth' if 'layers' in size else 'width'}-{len(rows)}"
                t1 = time.time()
                done = growkit.shrink(src_dir, out, seed=args.seed, quiet=True, **size, **opts)
                secs = time.time() - t1
                model = load(out)
                row = {"val_loss": evaluate(model, val_ids), "shrink_seconds": round(secs, 1), "dir": str(out)}
                if "rescale_losses" in done.provenance["options"]:
                    row["rescale_chosen"] = done.provenance["options"]["rescale_chosen"]
                    row["candidates"] = candidates(src_dir, work / "candidate", size, calib, val_ids, args.seed,
                                                   done.provenance["options"]["rescale_losses"])
                if "layers" not in size:
                    ckpt = load_checkpoint(src_dir)
                    oo = shrink_options(opts["method"], opts.get("calibration"), None, None, opts.get("rescale"))
                    kept = plan_growth(ckpt, **size, method=opts["method"], direction="shrink", depth_method=None,
                                       operator_options=oo).maps.hidden.src
                    row["scales"] = scales(source, model, kept, probe)
                rows[vname] = row
                first_dir = first_dir or out
                print(f"[{family}] {tname} {vname}: val {row['val_loss']:.4f} {row.get('scales', '')}", flush=True)
            shrunk_cfg = load(first_dir).config

            def make_random(cfg=shrunk_cfg):
                torch.manual_seed(args.seed)
                return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)

            rows["random init"] = {"val_loss": evaluate(make_random().eval(), val_ids)}
            for vname in trained_rows:
                path = None if vname == "random init" else Path(rows[vname]["dir"])
                rows[vname]["trained"] = {}
                for lr in lrs:
                    t1 = time.time()
                    loss = train_copy(path, make_random, train_ids, val_ids, args.steps, lr, args.seed)
                    rows[vname]["trained"][str(lr)] = loss
                    print(f"[{family}] {tname} {vname} after {args.steps} steps at lr {lr:g}: val {loss:.4f} "
                          f"({time.time() - t1:.0f}s)", flush=True)
            rows["_parameters"] = sum(p.numel() for p in make_random().parameters())
            fam["targets"][tname] = rows

        for vname in (main_row, "select"):
            shrunk_dir = Path(fam["targets"]["0.5x width"][vname]["dir"])
            back = growkit.grow(shrunk_dir, work / f"{family}-roundtrip-{vname.split(' ')[0].strip(',')}", width="2x",
                                method="clone", quiet=True)
            regrown, shrunk = load(back.out_dir), load(shrunk_dir)
            with torch.no_grad():
                d = float((regrown(input_ids=probe).logits - shrunk(input_ids=probe).logits).abs().max())
            fam["round_trip"][vname] = {"val_loss": evaluate(regrown, val_ids), "max_abs_dlogits_vs_shrunk": d,
                                        "source_val_loss": src_loss}
            print(f"[{family}] round trip {vname}: {fam['round_trip'][vname]}", flush=True)

    results["seconds"] = round(time.time() - t_start)
    results["cpu_seconds"] = round(time.process_time())
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(tables(results, lrs, args))


def tables(results: dict, lrs: list[float], args: argparse.Namespace) -> str:
    out = []
    for family, fam in results["families"].items():
        src = fam["source"]
        out.append(f"\n**{family}** source: d 128, 4 layers, {src['parameters']:,} parameters, trained "
                   f"{args.source_steps} steps, val loss {src['val_loss']:.4f}\n")
        for tname, rows in fam["targets"].items():
            lr_cols = " | ".join(f"after {args.steps} steps, lr {lr:g}" for lr in lrs)
            out.append(f"\n{tname} ({rows['_parameters']:,} parameters)\n")
            out.append(f"| init | val loss right after | {lr_cols} | stream RMS | final-norm RMS | logits std |")
            out.append("|---|---|" + "---|" * len(lrs) + "---|---|---|")
            for vname, row in rows.items():
                if vname.startswith("_"):
                    continue
                trained = " | ".join(f"{row['trained'][str(lr)]:.4f}" if "trained" in row else "" for lr in lrs)
                sc = row.get("scales")
                scs = (f"{sc['stream']:.2f} | {sc['final_norm']:.2f} | {sc['logits']:.2f}" if sc else " | | ")
                chosen = f" → {row['rescale_chosen']}" if "rescale_chosen" in row else ""
                out.append(f"| {vname}{chosen} | {row['val_loss']:.4f} | {trained} | {scs} |")
            for vname, row in rows.items():
                if isinstance(row, dict) and "candidates" in row:
                    out.append(f"\n{tname}, {vname} candidates (chosen: {row['rescale_chosen']})\n")
                    out.append("| rescale | held-out calibration loss | val loss |")
                    out.append("|---|---|---|")
                    for mode, c in row["candidates"].items():
                        out.append(f"| {mode} | {c['heldout_calibration_loss']:.4f} | {c['val_loss']:.4f} |")
        out.append("\nRound trip (shrink 0.5x, then clone 2x):\n")
        out.append("| shrink method | original val loss | round-trip val loss | max abs dlogits regrown vs shrunk |")
        out.append("|---|---|---|---|")
        for vname, r in fam["round_trip"].items():
            out.append(f"| {vname} | {r['source_val_loss']:.4f} | {r['val_loss']:.4f} | "
                       f"{r['max_abs_dlogits_vs_shrunk']:.2g} |")
    out.append(f"\ntotal {results['seconds']} s wall, {results['cpu_seconds']} s CPU")
    return "\n".join(out)


if __name__ == "__main__":
    main()
