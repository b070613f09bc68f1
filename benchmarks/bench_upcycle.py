"""Sparse upcycling on CPU: does a dense model upcycled into a mixture of experts train better than the dense model
continued, and than the same MoE from scratch?

A small dense Llama is trained on the stdlib split; from it, at equal further steps (same data order, schedule and
LR): (a) the dense model continued; (b) upcycled Mixtral, E in {4, 8}, top-2 (`growkit upcycle`); (c) fine-grained
upcycling with the same active and total parameters as E=4 top-2 (granularity 4, 16 experts, top-8); (d) the E=8
top-2 MoE from scratch, trained for the dense model's steps plus the further steps. Reported: validation loss curves
and, for the MoEs, each expert's share of routed tokens on the validation blocks (load balance).

    python benchmarks/bench_upcycle.py --dense-steps 150 --steps 100 --batch 8
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from _train_common import EVAL_BLOCKS, REPO, fmt, prepare_run, run, save_json

sys.path.insert(0, str(REPO))
from growkit.train.moe import router_loss_setup  # noqa: E402
from growkit.upcycle import upcycle  # noqa: E402

DIMS = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=128, tie_word_embeddings=False)
DENSE_FFN = 176
#: label -> upcycle options
UPCYCLED = {
    "upcycled E4 top-2": dict(experts=4, top_k=2),
    "upcycled E8 top-2": dict(experts=8, top_k=2),
    "fine-grained G4 E16 top-8": dict(experts=16, top_k=8, granularity=4),
}


def dense_config(vocab: int):
    import transformers as T

    return T.LlamaConfig(vocab_size=vocab, intermediate_size=DENSE_FFN, **DIMS)


def scratch_moe_config(vocab: int):
    import transformers as T

    return T.MixtralConfig(vocab_size=vocab, intermediate_size=DENSE_FFN, num_local_experts=8, num_experts_per_tok=2,
                           **DIMS)


@torch.no_grad()
def expert_shares(model, val_blocks, batch: int = 16) -> list[list[float]]:
    """Per layer, each expert's share of the routed (token, slot) choices on the validation blocks."""
    router_loss_setup(model, None)
    model.eval()
    counts = None
    for i in range(0, min(EVAL_BLOCKS, len(val_blocks)), batch):
        x = val_blocks.batch(list(range(i, min(i + batch, EVAL_BLOCKS, len(val_blocks)))))
        logits = model(input_ids=x).router_logits
        k = model.config.num_experts_per_tok
        layer_counts = torch.stack([torch.bincount(lg.topk(k, dim=-1).indices.reshape(-1), minlength=lg.shape[-1])
                                    for lg in logits]).double()
        counts = layer_counts if counts is None else counts + layer_counts
    assert counts is not None
    return (counts / counts.sum(dim=1, keepdim=True)).tolist()


def balance(shares: list[list[float]]) -> str:
    """Largest and smallest expert share over all layers, against the uniform 1/E."""
    flat = [s for layer in shares for s in layer]
    return f"{min(flat):.3f}-{max(flat):.3f} (1/E {1 / len(shares[0]):.3f})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dense-steps", type=int, default=150, help="steps of the dense model before upcycling")
    ap.add_argument("--steps", type=int, default=100, help="further steps of every continued / upcycled run")
    ap.add_argument("--batch", type=int, default=8, help="sequences of 128 tokens per step")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--aux", type=float, default=0.01, help="load-balancing loss coefficient of the MoE runs")
    ap.add_argument("--eval-every", type=int, default=25)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="[default: benchmarks/results/upcycle]")
    args = ap.parse_args()
    tok, train_blocks, val_blocks, acc = prepare_run(args, REPO / "benchmarks" / "results" / "upcycle")
    import transformers as T

    common = dict(lr=args.lr, eval_every=args.eval_every, seed=args.seed, accelerator=acc, batch_size=args.batch)
    work = Path(tempfile.mkdtemp(prefix="bench-upcycle-"))
    results: dict = {"args": {k: str(v) for k, v in vars(args).items()}, "runs": {}}
    try:
        torch.manual_seed(args.seed)
        dense = T.AutoModelForCausalLM.from_config(dense_config(len(tok)))
        curve = run(dense, "dense pre-training", train_blocks, val_blocks, steps=args.dense_steps, **common)
        results["runs"]["dense pre-training"] = curve.as_dict()
        dense_dir = work / "dense"
        dense.save_pretrained(dense_dir)
        tok.save_pretrained(dense_dir)

        def record(label: str, model, curve) -> None:
            entry = curve.as_dict()
            if getattr(model.config, "num_experts_per_tok", None):
                entry["expert_shares"] = expert_shares(model, val_blocks)
            entry["parameters"] = sum(p.numel() for p in model.parameters())
            results["runs"][label] = entry
            print(f"{label}: val {fmt(curve.losses[-1], '.4f')} after {curve.completed} steps, {curve.seconds:.0f} s",
                  file=sys.stderr, flush=True)
            save_json(args.out / "upcycle.json", results)

        model = T.AutoModelForCausalLM.from_pretrained(dense_dir)
        record("dense continued", model, run(model, "dense continued", train_blocks, val_blocks, steps=args.steps,
                                             **common))
        for label, options in UPCYCLED.items():
            out = upcycle(dense_dir, work / label.replace(" ", "-"), quiet=True, seed=args.seed, **options).out_dir
            model = T.AutoModelForCausalLM.from_pretrained(out)
            record(label, model, run(model, label, train_blocks, val_blocks, steps=args.steps,
                                     router_aux_loss_coef=args.aux, **common))
        torch.manual_seed(args.seed)
        model = T.AutoModelForCausalLM.from_config(scratch_moe_config(len(tok)))
        total = args.dense_steps + args.steps
        record("MoE E8 top-2 from scratch", model, run(model, "MoE from scratch", train_blocks, val_blocks,
                                                       steps=total, router_aux_loss_coef=args.aux, **common))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(table(results, args.steps))


def table(results: dict, steps: int) -> str:
    rows = ["| run | parameters | val loss at +0 | at +{s} | final | expert shares (min-max) |".format(s=steps),
            "|---|---|---|---|---|---|"]
    for label, r in results["runs"].items():
        if label == "dense pre-training":
            continue
        at = dict(zip(r["steps"], r["losses"]))
        rows.append(f"| {label} | {r['parameters']:,} | {fmt(r['losses'][0], '.4f')} | {fmt(at.get(steps), '.4f')} | "
                    f"{fmt(r['losses'][-1], '.4f')} (step {r['steps'][-1]}) | "
                    f"{balance(r['expert_shares']) if 'expert_shares' in r else '-'} |")
    return "\n".join(rows)


if __name__ == "__main__":
    main()
