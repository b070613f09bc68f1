"""The LayerNorm families (GPT-NeoX, StarCoder2, OPT) beyond the family matrix: `net2net` at any ratio is exact
where the residual stream keeps its width (the matrix's net2net cell grows hidden too, and LayerNorm's mean over
hidden moves with unequal multiplicities), and a bare file of theirs is refused naming its family."""

from __future__ import annotations

import shutil

import pytest

from growkit import grow
from growkit.checkpoint.reader import load_checkpoint
from growkit.errors import GrowkitError

CASES = ["gpt_neox", "gpt_neox-sequential-tied", "starcoder2", "starcoder2-untied", "opt", "opt-post-ln-untied",
         "opt-post-ln-proj"]


@pytest.mark.parametrize("case", CASES)
def test_net2net_inside_the_blocks_is_exact_at_any_ratio(tiny, tmp_path, case):
    v = grow(tiny(case), tmp_path / "out", ffn=72, method="net2net", verify=True,
             quiet=True).provenance["verification"]
    assert v["missing_keys"] == [] and v["unexpected_keys"] == [], v
    assert v["max_abs_dlogits"] <= 1e-5 * v["max_abs_logit"], v


@pytest.mark.parametrize("case, family", [("gpt_neox", "gpt_neox"), ("starcoder2", "starcoder2"),
                                          ("opt-post-ln-proj", "opt")])
def test_bare_file_without_config_is_refused_naming_its_family(tiny, tmp_path, case, family):
    bare = tmp_path / "bare.safetensors"
    shutil.copy(tiny(case) / "model.safetensors", bare)  # the names exactly as transformers saves them
    with pytest.raises(GrowkitError) as err:
        load_checkpoint(bare)
    message = str(err.value)
    assert f"cannot infer a {family} config: the tensor shapes do not say how many attention heads" in message
    assert "\n" not in message
