"""RC-ansatz benchmarks: the RC covariance test on the bundled models, rc-sample's loss right after growth at
2x/4x/8x width, and norm-distribution distances (source vs grown, and two independently trained widths).

    python benchmarks/bench_rc.py rc-test                 # RC test per tensor, tiny-gpt2 and tiny-llama
    python benchmarks/bench_rc.py growth                  # rc-sample 2x/4x/8x x estimator x seed, held-out loss
    python benchmarks/bench_rc.py growth-table            # the growth tables again, from the saved JSON
    python benchmarks/bench_rc.py widths                  # train GPT-2 d64 (seed 1) and d128 (seed 1), distances

Every table is printed as markdown and the raw numbers are written to benchmarks/results/bench_rc_<part>.json.
Held-out loss: mean next-token cross-entropy on the first 64 blocks of 128 tokens of the stdlib validation split
(`growkit.train.data`, the bundled tokenizer), the same protocol as models/defaults.json.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from growkit import grow, inspect  # noqa: E402
from growkit.measure.plots import short_name  # noqa: E402

MODELS = REPO / "models"
RESULTS = REPO / "benchmarks" / "results"
ESTIMATORS = ("empirical", "kde", "gaussian")


def _save(part: str, data: Any) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"bench_rc_{part}.json").write_text(json.dumps(data, indent=1) + "\n")


def _p(p: float) -> str:
    return f"{p:.3f}" if p >= 0.001 else f"{p:.0e}"


# ---------------------------------------------------------------------------------------------------- RC test
def rc_test(args: argparse.Namespace) -> None:
    out: dict[str, Any] = {}
    for model in ("tiny-gpt2", "tiny-llama"):
        t0 = time.time()
        report = inspect(MODELS / model, permutations=args.permutations, max_dim=args.max_dim, seed=0)
        rows = report.rc_table()
        out[model] = rows
        print(f"\n### {model} ({report.permutations} randomizations, window <= {args.max_dim}, "
              f"{time.time() - t0:.0f}s)\n")
        print("| tensor | window | same row: corr (p, z) | same column: corr (p, z) | disjoint: corr (p, z) | RC |")
        print("|---|---|---|---|---|---|")
        for r in rows:
            cells = [f"{r[f'corr_{k}']:+.4f} ({_p(r[f'p_{k}'])}, {r[f'z_{k}']:.1f})" for k in ("row", "col", "disjoint")]
            print(f"| {short_name(r['template'], r['layer'])} | {r['rows']}x{r['cols']} | " + " | ".join(cells)
                  + f" | {'pass' if r['passes'] else 'fail'} |")
        kinds: dict[str, list[dict[str, Any]]] = {}
        for r in rows:
            kinds.setdefault(short_name(r["template"]), []).append(r)
        print("\nPer tensor kind (over layers): how many matrices show each effect at p < 0.01\n")
        print("| kind | matrices | row effect | column effect | disjoint effect | pass |")
        print("|---|---|---|---|---|---|")
        for kind, rs in kinds.items():
            count = lambda key: sum(r[f"p_{key}"] < 0.01 for r in rs)  # noqa: E731
            print(f"| {kind} | {len(rs)} | {count('row')} | {count('col')} | {count('disjoint')} | "
                  f"{sum(r['passes'] for r in rs)} |")
    _save("rc_test", out)


# ---------------------------------------------------------------------------------------------------- growth
def _val_blocks() -> torch.Tensor:
    from make_defaults import encode  # the bundled models' own protocol
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast.from_pretrained(MODELS / "tokenizer")
    return encode(tok, "val")


def _loss(path: Path, val: torch.Tensor) -> tuple[float, dict[str, list[str]]]:
    from make_defaults import evaluate
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, output_loading_info=True)
    return evaluate(model.eval(), val), {k: sorted(info[k]) for k in ("missing_keys", "unexpected_keys")}


def _fit_trend(widths: list[float], gaps: list[float]) -> dict[str, Any]:
    """Least squares of log(gap) on log(width ratio k): gap ~ c k^b (if every gap is positive; else linear in
    log2 k). Also the one-parameter fit gap = a v(k), v(k) = (k-1)/k^2 the variance of a mean-field sum
    (n/N) sum_p f(x_p) relative to the source's when N = kn, n terms are kept and N - n drawn i.i.d. from the n atoms
    (the reference a loss gap quadratic in the error would follow)."""
    from scipy import stats

    k, g = np.asarray(widths, dtype=float), np.asarray(gaps, dtype=float)
    shape = (k - 1) / k**2
    a = float((shape * g).sum() / (shape**2).sum())
    r2_shape = 1 - float(((g - a * shape) ** 2).sum() / ((g - g.mean()) ** 2).sum())
    ref = {"a_mf": a, "r2_mf": r2_shape}
    if g.min() <= 0:
        lin = stats.linregress(np.log2(k), g)
        return {"model": "gap = a + b log2(k)", "b": lin.slope, "b_stderr": lin.stderr, "p": lin.pvalue,
                "r2": lin.rvalue**2, **ref}
    fit = stats.linregress(np.log(k), np.log(g))
    return {"model": "gap = c k^b", "b": fit.slope, "b_stderr": fit.stderr, "p": fit.pvalue,
            "c": math.exp(fit.intercept), "r2": fit.rvalue**2, **ref}


def growth(args: argparse.Namespace) -> None:
    val = _val_blocks()
    results: dict[str, Any] = {}
    for model in args.models:
        src = MODELS / model
        base, _ = _loss(src, val)
        res: dict[str, Any] = {"source_loss": base, "runs": []}
        print(f"\n### {model}: source held-out loss {base:.4f}\n", flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            configs = [("clone", None, None), ("net2net", None, None)] if args.baselines else []
            configs += [("rc-sample", e, s) for s in ("iid", "stratified") for e in args.estimators]
            for method, estimator, sampling in configs:
                for width in args.widths:
                    seeds = [0] if method == "clone" else list(range(args.seeds))
                    for seed in seeds:
                        opts = {"estimator": estimator, "sampling": sampling} if estimator else None
                        t0 = time.time()
                        out = grow(src, Path(tmp) / "g", width=f"{width}x", method=method, seed=seed, quiet=True,
                                   overwrite=True, operator_options=opts)
                        secs = time.time() - t0
                        loss, info = _loss(out.out_dir, val)
                        run = dict(method=method, estimator=estimator, sampling=sampling, width=width,
                                   seed=seed, loss=loss, gap=loss - base, grow_seconds=secs, **info)
                        res["runs"].append(run)
                        print(f"  {method:9s} {str(estimator):9s} {str(sampling):10s} {width}x seed {seed}: "
                              f"loss {loss:.4f} (gap {loss - base:+.4f}) keys ok={not any(info.values())} "
                              f"{secs:.1f}s", flush=True)
        results[model] = res
        _save(f"growth{args.tag}", results)
    _growth_tables(results, args.widths)


def growth_table(args: argparse.Namespace) -> None:
    """Re-render the growth tables from the saved JSON files (no growing); several tags are merged per model."""
    results: dict[str, Any] = {}
    for tag in args.tag:
        for model, res in json.loads((RESULTS / f"bench_rc_growth{tag}.json").read_text()).items():
            if model in results:
                results[model]["runs"] += res["runs"]
            else:
                results[model] = res
    widths = sorted({r["width"] for res in results.values() for r in res["runs"]})
    _growth_tables(results, widths)


def _growth_tables(results: dict[str, Any], widths: list[int]) -> None:
    for model, res in results.items():
        print(f"\n### {model}: held-out loss right after growth (source {res['source_loss']:.4f}); "
              "mean ± std over seeds of the gap to the source\n")
        print("v(k) = (k-1)/k² (see _fit_trend).\n")
        print("| method | estimator | draws | " + " | ".join(f"{w}x gap" for w in widths)
              + " | power law gap = c k^b | gap = a v(k) |")
        print("|---|---|---|" + "---|" * len(widths) + "---|---|")
        groups: dict[tuple, list[dict[str, Any]]] = {}
        for r in res["runs"]:
            groups.setdefault((r["method"], r["estimator"], r.get("sampling")), []).append(r)
        for (method, estimator, sampling), runs in groups.items():
            cells = []
            for w in widths:
                gaps = [r["gap"] for r in runs if r["width"] == w]
                cells.append("-" if not gaps else f"{np.mean(gaps):+.4f} ± {np.std(gaps):.4f}" if len(gaps) > 1
                             else f"{gaps[0]:+.4f}")
            xs = [r["width"] for r in runs]
            trend = _fit_trend(xs, [r["gap"] for r in runs]) if method == "rc-sample" and len(set(xs)) > 1 \
                else None
            trend_text = "- | -" if trend is None else (
                f"b = {trend['b']:+.2f} ± {trend['b_stderr']:.2f} (p {trend['p']:.2g}, R² {trend['r2']:.2f})"
                f"{'' if trend['model'] == 'gap = c k^b' else ' [' + trend['model'] + ']'} | "
                f"a = {trend['a_mf']:.2f}, R² {trend['r2_mf']:.2f}")
            draws = sampling or "-"
            print(f"| {method} | {estimator or '-'} | {draws} | " + " | ".join(cells) + f" | {trend_text} |")
            if trend is not None:
                res.setdefault("trends", {})[f"{estimator}/{sampling}"] = trend
        bad = [r for r in res["runs"] if r["missing_keys"] or r["unexpected_keys"]]
        print(f"\nLoaded with transformers: {len(res['runs']) - len(bad)}/{len(res['runs'])} outputs without missing "
              "or unexpected keys.")


# ---------------------------------------------------------------------------------------------------- distances
def _train_gpt2(hidden: int, seed: int, steps: int, out: Path) -> float:
    """GPT-2 with the bundled tiny-gpt2's recipe (make_defaults.py) at another width and seed."""
    from make_defaults import encode, save, train
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast.from_pretrained(MODELS / "tokenizer")
    train_ids, val_ids = encode(tok, "train"), encode(tok, "val")
    cfg = GPT2Config(n_embd=hidden, n_layer=2, n_head=hidden // 16, n_positions=256, n_inner=4 * hidden,
                     tie_word_embeddings=True, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, vocab_size=len(tok),
                     bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(cfg)
    loss = train(model, train_ids, val_ids, steps, 3e-3, seed)
    save(model, tok, out)
    return loss


def _summarise(report: Any) -> dict[str, dict[str, float]]:
    """Mean relative W1 and mean KS over matrices (rows, cols) and vectors (entries)."""
    out: dict[str, dict[str, float]] = {}
    for side in ("rows", "cols", "entries"):
        ds = [d.distance for d in report.distances if d.side == side]
        if ds:
            out[side] = {"w1_rel": float(np.mean([d.w1_rel for d in ds])), "ks": float(np.mean([d.ks for d in ds])),
                         "ks_p_below_0.01": int(sum(d.ks_p < 0.01 for d in ds)), "count": len(ds)}
    return out


def widths(args: argparse.Namespace) -> None:
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    trained = {}
    for hidden in (64, 128):
        path = work / f"gpt2-d{hidden}-seed1"
        if not (path / "model.safetensors").is_file():
            t0 = time.time()
            loss = _train_gpt2(hidden, 1, args.steps, path)
            print(f"trained d{hidden} seed 1: val {loss:.4f} ({time.time() - t0:.0f}s)", flush=True)
        trained[hidden] = path
    pairs = [("tiny-gpt2 (d64, seed 0) vs d64 seed 1: same width, independent", MODELS / "tiny-gpt2", trained[64]),
             ("tiny-gpt2 (d64, seed 0) vs d128 seed 1: 2x width, independent", MODELS / "tiny-gpt2", trained[128]),
             ("d64 seed 1 vs d128 seed 1: 2x width, independent", trained[64], trained[128])]
    with tempfile.TemporaryDirectory() as tmp:
        for method, estimator in (("clone", None), ("rc-sample", "empirical"), ("rc-sample", "kde"),
                                  ("rc-sample", "gaussian")):
            opts = {"estimator": estimator} if estimator else None
            out = grow(MODELS / "tiny-gpt2", Path(tmp) / f"{method}-{estimator}", width="2x", method=method,
                       quiet=True, operator_options=opts).out_dir
            pairs.append((f"tiny-gpt2 vs its 2x {method}{' ' + estimator if estimator else ''}", MODELS / "tiny-gpt2",
                          out))
        results = []
        for units in ("mf", "sp", "raw"):
            print(f"\n### distances of RMS-norm distributions, {units} units (mean over tensors; KS: mean statistic, "
                  "tensors with p < 0.01)\n")
            print("| pair | rows W1 rel | rows KS (p<0.01) | cols W1 rel | cols KS (p<0.01) | vectors W1 rel | "
                  "vectors KS (p<0.01) |")
            print("|---|---|---|---|---|---|---|")
            for label, a, b in pairs:
                report = inspect(a, compare=b, units=units, permutations=2, max_dim=8)  # RC test not used here
                s = _summarise(report)
                results.append({"pair": label, "units": units, "summary": s,
                                "distances": [d.model_dump() for d in report.distances]})
                cells = []
                for side in ("rows", "cols", "entries"):
                    x = s[side]
                    cells += [f"{x['w1_rel']:.3f}", f"{x['ks']:.3f} ({x['ks_p_below_0.01']}/{x['count']})"]
                print(f"| {label} | " + " | ".join(cells) + " |", flush=True)
        report = inspect(MODELS / "tiny-gpt2", compare=trained[128], units="raw", permutations=2, max_dim=8)
        a, b = report.samples("source"), report.samples("compare")
        ratios = {n: float(np.sqrt(np.mean(b[n]["rows"] ** 2) / np.mean(a[n]["rows"] ** 2))) for n in a if "rows" in a[n]}
        print("\n#### RMS entry of each matrix, d128 seed 1 / tiny-gpt2 (raw units; mean-field scaling would give 0.5, "
              "standard scaling 0.71)\n")
        print("| " + " | ".join(short_name(n) for n in ratios) + " |")
        print("|" + "---|" * len(ratios))
        print("| " + " | ".join(f"{v:.2f}" for v in ratios.values()) + " |")
        results.append({"pair": "rms entry ratio d128/d64", "ratios": ratios})
    _save("widths", results)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="part", required=True)
    p = sub.add_parser("rc-test")
    p.add_argument("--permutations", type=int, default=999)
    p.add_argument("--max-dim", type=int, default=256)
    p = sub.add_parser("growth")
    p.add_argument("--models", nargs="+", default=["tiny-gpt2", "tiny-llama"])
    p.add_argument("--widths", nargs="+", type=int, default=[2, 4, 8])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--estimators", nargs="+", default=list(ESTIMATORS))
    p.add_argument("--no-baselines", dest="baselines", action="store_false", help="skip clone and net2net")
    p.add_argument("--tag", default="", help="suffix of the results file, bench_rc_growth<tag>.json")
    p = sub.add_parser("growth-table", help="re-render the growth tables from benchmarks/results/bench_rc_growth.json")
    p.add_argument("--tag", nargs="+", default=[""], help="results files to merge, e.g. --tag '' _16x")
    p = sub.add_parser("widths")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--work", default="/tmp/growkit-bench-widths", help="where the trained widths are kept")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    {"rc-test": rc_test, "growth": growth, "growth-table": growth_table, "widths": widths}[args.part](args)


if __name__ == "__main__":
    main()
