"""Every family x every operator, on tiny real `transformers` models: one matrix.

A case is a tiny config name from `conftest.tiny_config` (a family with GQA where it has it, tied and untied where it
allows both). A cell is one operator on one case; it is exact (max |dlogits| <= 1e-5 x max |logit| and the output
loads with no missing or unexpected keys), runs (loads cleanly, finite loss), or is refused in one line before any
tensor is read. A family is added by adding its cases here and in `conftest.tiny_config`, and its refused or
inexact cells (with the reason) to the tables below; those must be the limits the family declares in its arch/ file
(`Family.limits`), which README's family table shows.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import transformers as T
from conftest import randomize, tiny_config

import growkit
from growkit import grow, shrink
from growkit.arch.registry import FAMILIES, family_for
from growkit.arch.spec import Limit
from growkit.capabilities import family_table
from growkit.checkpoint.reader import StateDictCheckpoint, load_checkpoint
from growkit.errors import GrowkitError
from growkit.pipeline import plan_growth
from growkit.train.data import write_stdlib_corpus

REPO = Path(__file__).resolve().parent.parent
TOKENIZER = REPO / "models" / "tokenizer"

CASES = ["gpt2", "gpt2-untied", "llama-gqa4", "llama-tied", "mistral", "qwen2", "qwen3", "qwen3-tied",
         "gpt_neox", "gpt_neox-sequential-tied", "starcoder2", "starcoder2-untied",
         "opt", "opt-post-ln-untied", "opt-post-ln-proj",
         "gemma", "gemma-untied", "gemma2", "gemma3", "gemma3-untied", "granite", "granite-tied",
         "phi3", "phi3-tied", "olmo2", "olmo2-tied"]

#: cell -> (function, request); exact cells assert function preservation, the others that the output loads
CELLS = {
    "clone-2x": (grow, dict(width="2x", method="clone")),
    "clone-3x": (grow, dict(width="3x", method="clone")),
    "identity-2x": (grow, dict(layers="2x", depth_method="identity")),
    "net2net-1.5x": (grow, dict(width="1.5q", method="net2net")),
    "copy-pad-2x": (grow, dict(width="2x", method="copy-pad")),
    "rc-sample-2x": (grow, dict(width="2x", method="rc-sample")),
    "subclone-1.5x": (grow, dict(width="1.5q", method="subclone")),
    "subclone-shrink": (shrink, dict(width="0.5q", layers=1, method="subclone")),
    "select-shrink": (shrink, dict(width="0.5q", layers=1, method="select")),
}
LAYERNORM_CASES = ("gpt2", "gpt2-untied", "gpt_neox", "gpt_neox-sequential-tied", "starcoder2", "starcoder2-untied",
                   "opt", "opt-post-ln-untied", "opt-post-ln-proj")
EXACT = {"clone-2x", "clone-3x", "identity-2x", "net2net-1.5x", "copy-pad-2x", "rc-sample-2x", "subclone-1.5x"}

#: (case, cell) -> why the cell is not exact although its operator is exact elsewhere; each must be a limit its
#: family declares ("inexact"), and every such limit must be here
INEXACT = {
    # LayerNorm subtracts the mean over the hidden axis: unequal multiplicities or fresh coordinates move it (DESIGN §2)
    **{(case, cell): "LayerNorm's mean" for case in LAYERNORM_CASES
       for cell in ("net2net-1.5x", "copy-pad-2x", "rc-sample-2x", "subclone-1.5x")},
    # width 2x adds kv heads: a fresh kv head's key rows are non-zero (to train) and enter OLMo2's k norm statistic
    ("olmo2", "copy-pad-2x"): "k norm's statistic",
    ("olmo2-tied", "copy-pad-2x"): "k norm's statistic",
}
#: (case, cell) -> a fragment of the one-line refusal; each must be a limit its family declares ("refused"), and
#: every such limit must be here
REFUSED: dict[tuple[str, str], str] = {
    # a block that ends in a LayerNorm normalises the stream even when it writes nothing to it
    ("opt-post-ln-untied", "identity-2x"): "ends every block in a LayerNorm, so no block computes the identity",
    ("opt-post-ln-proj", "identity-2x"): "ends every block in a LayerNorm, so no block computes the identity",
}


def _save(case: str, path: Path, **overrides) -> Path:
    config = tiny_config(case)
    for key, value in overrides.items():
        setattr(config, key, value)
    torch.manual_seed(0)
    randomize(T.AutoModelForCausalLM.from_config(config)).save_pretrained(path)
    return path


def _resolved(request: dict, src: Path) -> dict:
    """`width="1.5q"`: hidden, ffn and query heads x 1.5 with GQA's kv heads kept (1.5 kv heads is no model);
    multi-head attention scales them together."""
    width = str(request.get("width", ""))
    if not width.endswith("q"):
        return request
    config = load_checkpoint(src).config
    sizes, factor = family_for(config).sizes(config), float(width[:-1])
    if sizes.kv_heads == sizes.heads:
        return {**request, "width": f"{factor}x"}
    return {**{k: v for k, v in request.items() if k != "width"}, "hidden": int(sizes.hidden * factor),
            "ffn": int(sizes.ffn * factor), "heads": int(sizes.heads * factor)}


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """One saved checkpoint per case, shared by the cells (operators never write to their source)."""
    made: dict[str, Path] = {}

    def get(case: str) -> Path:
        if case not in made:
            made[case] = _save(case, tmp_path_factory.mktemp(case) / "src")
        return made[case]

    return get


@pytest.mark.parametrize("cell", list(CELLS))
@pytest.mark.parametrize("case", CASES)
def test_family_operator_matrix(sources, tmp_path, case, cell):
    run, request = CELLS[cell]
    request = _resolved(request, sources(case))
    out = tmp_path / "out"
    if (case, cell) in REFUSED:
        with pytest.raises(GrowkitError) as err:
            run(sources(case), out, quiet=True, **request)
        message = str(err.value)
        assert REFUSED[case, cell] in message and "\n" not in message, message
        assert not out.exists()
        return
    result = run(sources(case), out, verify=True, quiet=True, **request)
    v = result.provenance["verification"]
    assert v["missing_keys"] == [] and v["unexpected_keys"] == [], v
    assert torch.isfinite(torch.tensor(v["grown_loss"])), v
    if cell in EXACT and (case, cell) not in INEXACT:
        assert v["max_abs_dlogits"] <= 1e-5 * v["max_abs_logit"], v


def _limits(case: str, cell: str, verdict: str) -> list[Limit]:
    """The limits the case's family declares for this cell's operator or depth growth, with this verdict."""
    run, request = CELLS[cell]
    config = tiny_config(case).to_dict()
    depth = request.get("depth_method", "stack") if run is grow and "layers" in request else None
    method = request.get("method", "clone")
    return [limit for limit in family_for(config).limits
            if limit.verdict == verdict and limit.holds(config) and limit.concerns(method, depth)]


@pytest.mark.parametrize("case", CASES)
def test_the_tables_are_the_families_declared_limits(case):
    """REFUSED and INEXACT cannot drift from what the families declare: a cell is in a table exactly when its
    family declares that limit for it, and the table's fragment is in the limit's one-line reason."""
    for cell in CELLS:
        refused = _limits(case, cell, "refused")
        assert bool(refused) == ((case, cell) in REFUSED), (case, cell, refused)
        if refused:
            assert any(REFUSED[case, cell] in limit.reason for limit in refused), (case, cell)
        inexact = _limits(case, cell, "inexact")
        if cell in EXACT:
            assert bool(inexact) == ((case, cell) in INEXACT), (case, cell, inexact)
        if inexact and (case, cell) in INEXACT:
            assert any(INEXACT[case, cell] in limit.reason for limit in inexact), (case, cell)


def test_a_declared_refusal_stops_before_any_tensor_is_read(tmp_path):
    """GPT-2 with attention scaled by layer index refuses depth growth in one line with its reason. The source's
    tensors are on the meta device (shapes, no values): reading one would fail, so the refusal came first."""
    config = tiny_config("gpt2")
    config.scale_attn_by_inverse_layer_idx = True
    with torch.device("meta"):
        model = T.AutoModelForCausalLM.from_config(config)
    ckpt = StateDictCheckpoint(model.state_dict(), config.to_dict(), "meta-gpt2")
    with pytest.raises(GrowkitError) as err:
        plan_growth(ckpt, layers="2x", depth_method="identity")
    message = str(err.value)
    assert message.startswith("meta-gpt2: --depth-method identity cannot grow a gpt2 model: ") and "\n" not in message
    assert "scale_attn_by_inverse_layer_idx ties each layer's attention scale to its index" in message
    plan_growth(ckpt, width="2x")  # width growth is not concerned: it plans (and reads nothing either)
    src = _save("gpt2", tmp_path / "src", scale_attn_by_inverse_layer_idx=True)
    with pytest.raises(GrowkitError, match="cannot grow a gpt2 model: scale_attn_by_inverse_layer_idx"):
        grow(src, tmp_path / "out", layers="2x", quiet=True)
    assert not (tmp_path / "out").exists()


def test_readme_family_table_is_the_registry_and_the_limits():
    readme = (REPO / "README.md").read_text()
    start = readme.index("<!-- family table: python -m growkit.capabilities -->\n")
    table = readme[readme.index("\n", start) + 1:readme.index("<!-- end of family table -->")]
    assert table == family_table()
    for family in FAMILIES:
        assert f"| `{family.name}` ({', '.join(family.model_types)}) |" in table


@pytest.mark.parametrize("case", CASES)
def test_inspect_runs_on_every_family(sources, case):
    report = growkit.inspect(sources(case), permutations=9, max_dim=16, rank=2, plots=False)
    assert report.family and report.tensors


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("corpus")
    return {"train": write_stdlib_corpus(d / "train.txt", "train", max_bytes=60_000),
            "val": write_stdlib_corpus(d / "val.txt", "val", max_bytes=20_000)}


@pytest.mark.parametrize("case", CASES)
def test_training_a_grown_model_with_mup_groups(tmp_path, corpus, case):
    """Five steps of `growkit train` on a 2x clone of each family, µP groups on (the base is the source)."""
    src = _save(case, tmp_path / "src", vocab_size=2048)  # the bundled tokenizer's vocabulary
    for f in TOKENIZER.iterdir():
        shutil.copy(f, src / f.name)
    grown = grow(src, tmp_path / "grown", width="2x", quiet=True).out_dir
    result = growkit.train(grown, corpus["train"], tmp_path / "trained", eval_data=corpus["val"], steps=5, lr=1e-3,
                           warmup=1, batch_size=2, seq_len=32, mup=True, quiet=True)
    losses = [h["loss"] for h in result.history if "loss" in h]
    assert result.steps == 5 and len(losses) == 5 and all(map(torch.isfinite, torch.tensor(losses)))
    assert (result.out_dir / "training.json").exists()
    assert '"mup": true' in (result.out_dir / "training.json").read_text()
