"""Exploration behind the speed-up benchmark: which growth protocol, noise level and schedule help a grown model?

Not a benchmark of record (bench_speedup.py is): a minimal loop (the bench recipe: AdamW 0.9/0.95, wd 0.1, clip
1.0, µP groups from growkit, warm-up 5% + cosine to 10%, batch 8 x 128, the same seeded block order and 128
validation blocks) without Accelerate, fast on a GPU. The stdlib corpus depends on the Python version, so tokens are
exported once where the benchmarks run and carried to the GPU machine:

    python benchmarks/explore_growth.py export-tokens /tmp/tokens          # on the benchmark machine (CPython 3.11)
    TOKENS=/tmp/tokens OUT=/tmp/out python benchmarks/explore_growth.py MODE ARCH [ARCH ...]

MODE: summarize DIR (markdown tables of the JSONs), protocols (restart vs continue, replayed vs fresh data, LR after growth), sym (noise levels), probe (every
operator, continue protocol), tie (tied vs untied head), late (growth late in the schedule, N 800 and 1600),
lrs (LR after growth with and without µP, scratch at the same LRs), diverge (do clones of the hidden axis
come apart in training?), untie (GPT-2: untie the head at growth).
Each mode writes OUT/explore-MODE.json (every run's eval curve); results are in benchmarks/results/explore/.
"""
import json, math, os, sys, time
from pathlib import Path
import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
import transformers as T
from _train_common import Curve, flops_per_token as flops, stdlib_blocks  # noqa: E402  (also puts the repo on sys.path)
import growkit  # noqa: E402
from growkit.train.blocks import BlockSampler  # noqa: E402
from growkit.train.loop import TrainConfig, lr_lambda  # noqa: E402
from growkit.train.mup import mup_param_groups  # noqa: E402

dev = "cuda" if torch.cuda.is_available() else "cpu"
SEQ, B, EVAL_N = 128, 8, 128
OUT = Path(os.environ.get("OUT", "/tmp"))
results = []
train_b = val_b = sampler = None


def load_tokens(d: Path) -> None:
    global train_b, val_b, sampler
    train = torch.from_numpy(np.load(d / "train.npy").astype(np.int64))
    val = torch.from_numpy(np.load(d / "val.npy").astype(np.int64))
    nb = len(train) // SEQ
    train_b = train[: nb * SEQ].view(nb, SEQ).to(dev)
    val_b = val[: (len(val) // SEQ) * SEQ].view(-1, SEQ)[:EVAL_N].to(dev)
    sampler = BlockSampler(nb, 0)


def export_tokens(d: Path) -> None:
    tok = T.AutoTokenizer.from_pretrained(ROOT / "models" / "tokenizer")
    tr, va = stdlib_blocks(tok)
    d.mkdir(parents=True, exist_ok=True)
    np.save(d / "train.npy", np.asarray(tr.tokens).astype(np.uint16))
    np.save(d / "val.npy", np.asarray(va.tokens).astype(np.uint16))


def cosine(total, warm):
    return lr_lambda(TrainConfig(steps=total, warmup=warm))


def wsd(total, warm, decay_frac=0.2, floor=0.1):
    dstart = total - int(decay_frac * total)
    def f(s):
        if s < warm:
            return (s + 1) / warm
        if s < dstart:
            return 1.0
        return 1.0 - (1 - floor) * (s - dstart) / max(1, total - dstart)
    return f


@torch.no_grad()
def evaluate(model):
    model.eval()
    tot = 0.0
    for i in range(0, EVAL_N, 32):
        x = val_b[i:i + 32]
        tot += float(model(input_ids=x, labels=x).loss) * len(x)
    model.train()
    return tot / EVAL_N


def fit(model, steps, lr, lr_fn, *, base=None, data_offset=0, sched_offset=0, eval_every=25, stop_below=None,
        optimizer_state=None):
    """Train `steps` steps; LR multiplier lr_fn(sched_offset + i); data from stream step data_offset + i."""
    model.to(dev).train()
    groups = mup_param_groups(model, base, lr, 0.1)
    for g in groups:
        g.pop("param_names", None)
    opt = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    base_lrs = [g["lr"] for g in opt.param_groups]
    steps_l, losses = [0], [evaluate(model)]
    for i in range(steps):
        m = lr_fn(sched_offset + i)
        for g, b in zip(opt.param_groups, base_lrs):
            g["lr"] = b * m
        idx = sampler.positions((data_offset + i) * B, B)
        x = train_b[idx]
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if (i + 1) % eval_every == 0 or i + 1 == steps:
            steps_l.append(i + 1)
            losses.append(evaluate(model))
            if stop_below is not None and losses[-1] <= stop_below:
                break
    return steps_l, losses


def reach(steps_l, losses, target):
    """Step at which the eval curve first reaches `target` (interpolated), as in the benchmarks."""
    return Curve("", list(steps_l), list(losses)).first_step_at_or_below(target)


def new_model(cfg, seed=0):
    torch.manual_seed(seed)
    return T.AutoModelForCausalLM.from_config(cfg)


def log(**kw):
    results.append(kw)
    print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in kw.items() if k != "curve"}), flush=True)
    (OUT / f"explore-{MODE}.json").write_text(json.dumps(results))


def experiment(arch, lr=3e-3):
    cfg = T.AutoConfig.from_pretrained(ROOT / "models" / f"tiny-{arch}")
    big_cfg = growkit.grow_model(new_model(cfg), width=2).config
    fs, fb = flops(cfg), flops(big_cfg)
    c_small = fs / fb
    scratch_cache = {}

    def scratch(N):
        if N not in scratch_cache:
            t0 = time.time()
            sl, ls = fit(new_model(big_cfg), N, lr, cosine(N, max(1, N // 20)))
            scratch_cache[N] = (sl, ls)
            log(arch=arch, what="scratch", N=N, final=ls[-1], sec=time.time() - t0, curve=[sl, ls])
        return scratch_cache[N]

    def small_model(S, sched):
        m = new_model(cfg)
        sl, ls = fit(m, S, lr, sched)
        return m, ls[-1], (sl, ls)

    # A/B/C: small fully trained (own cosine), grown with a fresh schedule; replay vs fresh data; LR and warm-up.
    for S in (800, 2400):
        small, small_loss, sc = small_model(S, cosine(S, max(1, S // 20)))
        log(arch=arch, what="small", S=S, final=small_loss, curve=sc)
        for N in (800, 1600):
            sl_s, ls_s = scratch(N)
            target = ls_s[-1]
            s_at = reach(sl_s, ls_s, small_loss)
            for noise in (None, 10.0):
                for data in ("replay", "fresh"):
                    for glr, warm in ((lr, N // 20), (lr, 0), (lr / 3, N // 20), (lr / 3, 0)):
                        if data == "replay" and (glr, warm) != (lr, N // 20):
                            continue
                        if noise is None and (data, glr, warm) != ("fresh", lr, N // 20):
                            continue
                        g = growkit.grow_model(small, width=2, method="clone", noise_snr_db=noise, seed=0)
                        sl, ls = fit(g, N, glr, cosine(N, max(1, warm)), base=cfg,
                                     data_offset=S if data == "fresh" else 0, stop_below=target)
                        r = reach(sl, ls, target)
                        log(arch=arch, what="grown-own-schedule", S=S, N=N, noise=noise, data=data, glr=glr,
                            warm=warm, small=small_loss, target=target, scratch_reaches_small_at=s_at,
                            reach=r, speedup=N / r if r else None,
                            counted=(N / (r + S * c_small)) if r is not None else None, best=min(ls), curve=[sl, ls])
        del small
    # D: progressive: one schedule of N steps (cosine or WSD), small for the first S, grown for the rest.
    for N in (800, 1600):
        for sname, sched in (("cosine", cosine(N, N // 20)), ("wsd", wsd(N, N // 20))):
            if sname == "wsd":
                sl_s, ls_s = fit(new_model(big_cfg), N, lr, sched)
                log(arch=arch, what="scratch-wsd", N=N, final=ls_s[-1], curve=[sl_s, ls_s])
                target = min(ls_s[-1], scratch(N)[1][-1])
            else:
                target = scratch(N)[1][-1]
            for frac in (0.25, 0.5, 0.75):
                S = int(frac * N)
                small, small_loss, _ = small_model(S, sched)
                g = growkit.grow_model(small, width=2, method="clone", noise_snr_db=10.0, seed=0)
                sl, ls = fit(g, N - S, lr, sched, base=cfg, data_offset=S, sched_offset=S, stop_below=None)
                r = reach(sl, ls, target)
                log(arch=arch, what="progressive", sched=sname, N=N, S=S, small=small_loss, after_growth=ls[0],
                    target=target, final=ls[-1], reach_after_growth=r,
                    speedup=N / r if r else None, counted=(N / (r + S * c_small)) if r is not None else None,
                    curve=[sl, ls])



def iid_noise(model, db, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.dim() == 2:
                p.add_((torch.randn(p.shape, generator=g) * float(p.std()) * 10 ** (-db / 20)).to(p.device))
    return model


def symmetry(arch, lr=3e-3, N=800):
    cfg = T.AutoConfig.from_pretrained(ROOT / "models" / f"tiny-{arch}")
    big_cfg = growkit.grow_model(new_model(cfg), width=2).config
    sl_s, ls_s = fit(new_model(big_cfg), N, lr, cosine(N, N // 20))
    target = ls_s[-1]
    log(arch=arch, what="scratch", N=N, final=target, curve=[sl_s, ls_s])
    variants = [("sym10", dict(noise_snr_db=10.0), None, True),
                ("sym0", dict(noise_snr_db=0.0), None, True), ("sym-6", dict(noise_snr_db=-6.0), None, True),
                ("sym-12", dict(noise_snr_db=-12.0), None, True), ("sym-20", dict(noise_snr_db=-20.0), None, True),
                ("sym-6-nomup", dict(noise_snr_db=-6.0), None, False),
                ("iid20", {}, 20.0, True), ("iid10", {}, 10.0, True), ("sym-6+iid20", dict(noise_snr_db=-6.0), 20.0, True)]
    for setup, S in (("progressive", N // 4), ("progressive", N // 2), ("own", N)):
        sched = cosine(N, N // 20) if setup == "progressive" else cosine(S, S // 20)
        small = new_model(cfg)
        _, ls_small = fit(small, S, lr, sched)
        for label, kw, iid, mup in variants:
            g = growkit.grow_model(small, width=2, method="clone", seed=0, **kw)
            if iid is not None:
                iid_noise(g, iid)
            if setup == "progressive":
                sl, ls = fit(g, N - S, lr, sched, base=cfg if mup else None, data_offset=S, sched_offset=S)
            else:
                sl, ls = fit(g, N, lr, cosine(N, N // 20), base=cfg if mup else None, data_offset=S, stop_below=target)
            r = reach(sl, ls, target)
            log(arch=arch, what="sym-" + setup, variant=label, S=S, small=ls_small[-1], after_growth=ls[0],
                target=target, final=ls[-1], best=min(ls), reach=r, speedup=N / r if r else None,
                counted=(N / (r + S * flops(cfg) / flops(big_cfg))) if r is not None else None, curve=[sl, ls])



def probe(arch, lr=3e-3, N=800, S=400):
    cfg = T.AutoConfig.from_pretrained(ROOT / "models" / f"tiny-{arch}")
    sched = cosine(N, N // 20)
    small = new_model(cfg)
    _, ls_small = fit(small, S, lr, sched)
    for kind, grow_kw in (("width", dict(width=2)), ("depth", dict(layers="2x"))):
        big_cfg = growkit.grow_model(small, **grow_kw).config
        sl_s, ls_s = fit(new_model(big_cfg), N, lr, sched)
        target = ls_s[-1]
        log(arch=arch, what="scratch", kind=kind, N=N, final=target, curve=[sl_s, ls_s])
        if kind == "width":
            variants = [("clone+noise10", dict(method="clone", noise_snr_db=10.0), lr, True),
                        ("clone+noise0", dict(method="clone", noise_snr_db=0.0), lr, True),
                        ("clone", dict(method="clone"), lr, True),
                        ("copy-pad", dict(method="copy-pad"), lr, True),
                        ("net2net", dict(method="net2net"), lr, True),
                        ("rc-sample", dict(method="rc-sample"), lr, True),
                        ("clone+noise0 lr2x", dict(method="clone", noise_snr_db=0.0), 2 * lr, True)]
        else:
            variants = [("stack", dict(depth_method="stack"), lr, True), ("identity", dict(depth_method="identity"), lr, True)]
        for label, kw, glr, mup in variants:
            g = growkit.grow_model(small, **grow_kw, seed=0, **kw)
            sl, ls = fit(g, N - S, glr, sched, base=cfg if mup else None, data_offset=S, sched_offset=S)
            r = reach(sl, ls, target)
            log(arch=arch, what="probe-progressive", kind=kind, variant=label, S=S, small=ls_small[-1],
                after_growth=ls[0], target=target, final=ls[-1], reach=r, speedup=N / r if r else None,
                counted=(N / (r + S * flops(cfg) / flops(big_cfg))) if r is not None else None, curve=[sl, ls])



def tie(arch, lr=3e-3, N=800, S=400):
    base = T.AutoConfig.from_pretrained(ROOT / "models" / f"tiny-{arch}")
    cfg = T.AutoConfig.from_pretrained(ROOT / "models" / f"tiny-{arch}", tie_word_embeddings=not base.tie_word_embeddings)
    sched = cosine(N, N // 20)
    small = new_model(cfg)
    _, ls_small = fit(small, S, lr, sched)
    sl_small, ls_small_full = fit(small, N - S, lr, sched, data_offset=S, sched_offset=S)
    log(arch=arch, what="tie-small-alone", tied=cfg.tie_word_embeddings, final=ls_small_full[-1])
    small = new_model(cfg)
    _, ls_small = fit(small, S, lr, sched)
    big_cfg = growkit.grow_model(small, width=2).config
    sl_s, ls_s = fit(new_model(big_cfg), N, lr, sched)
    target = ls_s[-1]
    log(arch=arch, what="scratch", tied=cfg.tie_word_embeddings, N=N, final=target)
    for label, kw in (("clone+noise0", dict(method="clone", noise_snr_db=0.0)), ("copy-pad", dict(method="copy-pad"))):
        g = growkit.grow_model(small, width=2, seed=0, **kw)
        sl, ls = fit(g, N - S, lr, sched, base=cfg, data_offset=S, sched_offset=S)
        r = reach(sl, ls, target)
        log(arch=arch, what="tie-progressive", tied=cfg.tie_word_embeddings, variant=label, small=ls_small[-1],
            after_growth=ls[0], target=target, final=ls[-1], reach=r, speedup=N / r if r else None)



def late(arch, lr=3e-3):
    cfg = T.AutoConfig.from_pretrained(ROOT / "models" / f"tiny-{arch}")
    big_cfg = growkit.grow_model(new_model(cfg), width=2).config
    scratch = {}
    for N, S in ((800, 600), (1600, 800), (1600, 1200), (1600, 1400)):
        sched = cosine(N, N // 20)
        if N not in scratch:
            scratch[N] = fit(new_model(big_cfg), N, lr, sched)[1][-1]
            log(arch=arch, what="scratch", N=N, final=scratch[N])
        target = scratch[N]
        small = new_model(cfg)
        _, ls_small = fit(small, S, lr, sched)
        for label, kw in (("clone+noise10", dict(method="clone", noise_snr_db=10.0)),
                          ("clone+noise0", dict(method="clone", noise_snr_db=0.0)), ("copy-pad", dict(method="copy-pad"))):
            g = growkit.grow_model(small, width=2, seed=0, **kw)
            sl, ls = fit(g, N - S, lr, sched, base=cfg, data_offset=S, sched_offset=S)
            r = reach(sl, ls, target)
            log(arch=arch, what="late-continue", variant=label, N=N, S=S, small=ls_small[-1], target=target,
                final=ls[-1], reach=r, speedup=N / r if r else None,
                counted=(N / (r + S * flops(cfg) / flops(big_cfg))) if r is not None else None)


def lrs(arch, lr=3e-3, N=800, S=400):
    """Continue protocol at several LRs after growth (µP on and off), and scratch at the same LRs."""
    cfg = T.AutoConfig.from_pretrained(ROOT / "models" / f"tiny-{arch}")
    sched = cosine(N, N // 20)
    small = new_model(cfg)
    fit(small, S, lr, sched)
    big_cfg = growkit.grow_model(small, width=2).config
    target = None
    for mult in (0.5, 1, 2, 4):
        ls = fit(new_model(big_cfg), N, lr * mult, sched)[1]
        log(arch=arch, what="scratch", glr=lr * mult, N=N, final=ls[-1])
        target = ls[-1] if mult == 1 else target
    for mult in (1, 2, 4, 8):
        for mup in (True, False):
            g = growkit.grow_model(small, width=2, seed=0, method="clone", noise_snr_db=0.0)
            sl, ls = fit(g, N - S, lr * mult, sched, base=cfg if mup else None, data_offset=S, sched_offset=S)
            r = reach(sl, ls, target)
            log(arch=arch, what="lr-continue", variant=f"clone+noise0 {'µP' if mup else 'no µP'}", glr=lr * mult,
                N=N, S=S, target=target, final=ls[-1], best=min(ls), reach=r, speedup=N / r if r else None)


def copy_gap(model, small_cfg) -> dict[str, float]:
    """How far the two copies of each cloned hidden coordinate have moved apart: per parameter whose dims hold the
    doubled hidden axis, ||w[.., i] - w[.., i + d]|| / ||w[.., i] + w[.., i + d]|| over all i < d (0 = still clones)."""
    d = small_cfg.hidden_size
    gaps = {}
    for name, p in model.named_parameters():
        for dim, size in enumerate(p.shape):
            if size == 2 * d and ("ln" in name or "norm" in name or p.dim() == 2):
                a, b = p.detach().float().narrow(dim, 0, d), p.detach().float().narrow(dim, d, d)
                gaps[f"{name}[{dim}]"] = float((a - b).norm() / (a + b).norm().clamp(min=1e-12))
                break
    return gaps


def diverge(arch, lr=3e-3, N=800, S=400):
    """Continue protocol, clone + 0 dB: do the copies of the hidden axis come apart during training?"""
    cfg = T.AutoConfig.from_pretrained(ROOT / "models" / f"tiny-{arch}")
    sched = cosine(N, N // 20)
    small = new_model(cfg)
    fit(small, S, lr, sched)
    g = growkit.grow_model(small, width=2, seed=0, method="clone", noise_snr_db=0.0)
    before = copy_gap(g, cfg)
    sl, ls = fit(g, N - S, lr, sched, base=cfg, data_offset=S, sched_offset=S)
    after = copy_gap(g, cfg)
    for k in before:
        log(arch=arch, what="copy-gap", variant=k, after_growth=before[k], final=after[k])
    log(arch=arch, what="copy-gap-loss", final=ls[-1])


def untie_head(model, noise_db: float, seed: int = 0):
    """A tied grown GPT-2 -> an untied one computing the same function: lm_head starts as the (cloned) embedding,
    plus noise that sums to zero over the two copies of each hidden coordinate (ln_f's outputs are equal there)."""
    w = model.transformer.wte.weight.detach().clone()
    d = w.shape[1] // 2
    gen = torch.Generator().manual_seed(seed)
    eps = (torch.randn(w.shape[0], d, generator=gen) * float(w.std()) * 10 ** (-noise_db / 20)).to(w.device)
    w[:, :d] += eps
    w[:, d:] -= eps
    model.config.tie_word_embeddings = False
    model.lm_head.weight = torch.nn.Parameter(w)
    return model


def untie(arch="gpt2", lr=3e-3, N=800, S=400):
    """Continue protocol on the tied GPT-2: does untying the head at growth let the clones use their width?"""
    cfg = T.AutoConfig.from_pretrained(ROOT / "models" / f"tiny-{arch}")
    sched = cosine(N, N // 20)
    small = new_model(cfg)
    fit(small, S, lr, sched)
    big = growkit.grow_model(small, width=2).config
    untied_big = T.AutoConfig.from_pretrained(ROOT / "models" / f"tiny-{arch}", tie_word_embeddings=False,
                                              n_embd=big.n_embd, n_head=big.n_head, n_inner=big.n_inner)
    ls = fit(new_model(untied_big), N, lr, sched)[1]
    log(arch=arch, what="scratch-untied", N=N, final=ls[-1])
    for label, head_db in (("clone+noise0, untied at growth, head noise 0 dB", 0.0),
                           ("clone+noise0, untied at growth, head noise 10 dB", 10.0)):
        g = growkit.grow_model(small, width=2, seed=0, method="clone", noise_snr_db=0.0)
        x = val_b[:8].cpu()
        with torch.no_grad():
            ref = g.to("cpu")(input_ids=x).logits
            untie_head(g, head_db)
            delta = float((g(input_ids=x).logits - ref).abs().max())
        sl, ls = fit(g, N - S, lr, sched, base=cfg, data_offset=S, sched_offset=S)
        gap = copy_gap(g, cfg)["transformer.wte.weight[1]"]
        log(arch=arch, what="untie-continue", variant=label, S=S, N=N, after_growth=ls[0], final=ls[-1],
            max_dlogits_untie=delta, wte_copy_gap=gap)


def summarize(d: Path) -> str:
    """Markdown tables of every explore-*.json in `d` (the figures RESULTS.md quotes)."""
    keys = ["arch", "what", "kind", "variant", "sched", "tied", "noise", "data", "glr", "warm", "N", "S", "small",
            "after_growth", "target", "final", "best", "reach", "reach_after_growth", "speedup", "counted"]
    out = []
    for f in sorted(d.glob("explore-*.json")):
        rows = [r for r in json.loads(f.read_text()) if r["what"] not in ("small",)]
        cols = [k for k in keys if any(k in r for r in rows)]
        out += [f"`{f.name}`", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        for r in rows:
            cell = lambda v: "" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v))
            out.append("| " + " | ".join(cell(r.get(k)) for k in cols) + " |")
        out.append("")
    return "\n".join(out)


MODES = {"protocols": experiment, "sym": symmetry, "probe": probe, "tie": tie, "late": late, "lrs": lrs, "diverge": diverge, "untie": untie}

if __name__ == "__main__":
    t0 = time.time()
    MODE = sys.argv[1]
    if MODE == "summarize":
        print(summarize(Path(sys.argv[2])))
        sys.exit(0)
    if MODE == "export-tokens":
        export_tokens(Path(sys.argv[2]))
        sys.exit(0)
    load_tokens(Path(os.environ["TOKENS"]))
    OUT.mkdir(parents=True, exist_ok=True)
    for arch in sys.argv[2:]:
        MODES[MODE](arch)
    print("total", time.time() - t0)
