"""A bare .safetensors file of a family whose tensor shapes do not record the head count is refused in one line that
names the family (not guessed, and not mistaken for a family with similar names)."""

from __future__ import annotations

import shutil

import pytest

from growkit.checkpoint.reader import load_checkpoint
from growkit.errors import GrowkitError


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
