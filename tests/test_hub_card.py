"""Model cards parse with huggingface_hub.ModelCard.load and carry the provenance (front matter and body)."""

from __future__ import annotations

import copy

import pytest
from huggingface_hub import ModelCard

from growkit.hub.card import write_model_card
from hub_fixtures import tiny_gpt2  # noqa: F401 (fixtures)


def provenance(source_path: str, hub_id: str | None = "openai-community/gpt2") -> dict:
    return {
        "growkit_version": "0.1.0",
        "kind": "grow",
        "source": {"path": source_path, "model_type": "gpt2", "config": {"n_embd": 32}, "hub_id": hub_id},
        "sizes": {"hidden": [32, 64], "ffn": [128, 256], "heads": [4, 8], "kv_heads": [4, 8], "layers": [2, 4],
                  "head_dim": [8, 8], "vocab": [300, 300]},
        "operator": "net2net",
        "depth_method": "stack",
        "layer_map": [0, 1, 0, 1],
        "identity_layers": [],
        "options": {"seed": 7, "noise_snr_db": 30.0, "dtype": "float32"},
        "parameters": [37_000, 150_000],
        "command": "growkit grow src --width 2x --layers 4 --method net2net --seed 7",
        "verification": {"max_abs_dlogits": 2.4e-7, "dloss": -3.1e-8, "missing_keys": []},
        "created": "2025-01-01T00:00:00+00:00",
    }


def test_card_front_matter_and_body(tmp_path, tiny_gpt2):
    prov = provenance(str(tiny_gpt2))
    prov["training"] = {"steps": 300, "tokens": 614400, "train_loss": 2.5125, "eval_loss": 2.6, "mup": True,
                        "data": ["/data/stdlib-train.txt"], "config": {"lr": 0.003, "batch_size": 16, "seq_len": 128}}
    prov["evaluation"] = {"loss": 2.71, "source_loss": 2.93, "tokens": 4096, "data": "stdlib val split"}
    out = tmp_path / "grown"
    out.mkdir()

    path = write_model_card(out, prov)

    assert path == out / "README.md"
    card = ModelCard.load(path)  # a local file: parsed, nothing fetched
    data = card.data.to_dict()
    assert data["library_name"] == "transformers"
    assert data["pipeline_tag"] == "text-generation"
    assert {"growkit", "model-growth", "gpt2", "net2net"} <= set(data["tags"])
    assert data["base_model"] == "openai-community/gpt2"
    assert data["base_model_relation"] == "finetune"
    assert data["license"] == "apache-2.0"  # read from the source checkpoint's own README.md
    body = card.text
    assert "| hidden | 32 | 64 | 2x |" in body
    assert "| layers | 2 | 4 | 2x |" in body
    assert "| **parameters** | 37,000 | 150,000 | 4.05x |" in body
    assert "- operator: `net2net`" in body and "- depth method: `stack`" in body
    assert "- seed: 7" in body and "- noise_snr_db: 30.0" in body
    assert "max \\|Δlogits\\|: 2.4e-07" in body and "Δloss (grown − source): -3.1e-08" in body
    assert "missing_keys" not in body  # empty lists are noise
    assert "- optimizer steps: 300" in body and "- tokens seen: 614,400" in body
    assert "- final training loss (mean of the last 20 steps): 2.5125" in body
    assert "- final validation loss: 2.6" in body
    assert "- training data: `stdlib-train.txt`" in body and "- settings: lr=0.003, batch_size=16, seq_len=128" in body
    assert "- this model: 2.71" in body and "- source model: 2.93" in body
    assert "on 4,096 tokens of stdlib val split" in body
    assert "```bash\ngrowkit grow src --width 2x --layers 4 --method net2net --seed 7\n```" in body


def test_card_without_hub_id_license_verification_or_training(tmp_path):
    prov = provenance(str(tmp_path / "nowhere"), hub_id=None)
    prov["verification"] = None
    prov["command"] = "python api"
    card = ModelCard.load(write_model_card(tmp_path, prov))
    data = card.data.to_dict()
    assert "base_model" not in data and "base_model_relation" not in data and "license" not in data
    assert "Not measured for this checkpoint" in card.text
    assert "## Training after growth" not in card.text and "## Evaluation" not in card.text
    # The Python API record becomes a call that reproduces it.
    assert (f"growkit.grow('{tmp_path / 'nowhere'}', hidden=64, ffn=256, heads=8, kv_heads=8, layers=4, "
            "method='net2net', depth_method='stack', seed=7, noise_snr_db=30.0)") in card.text


def test_card_for_recipe_and_shrink(tmp_path):
    prov = provenance("/models/src")
    prov["kind"] = "shrink"
    prov["operator"] = "subclone"
    prov["recipe"] = {"source": "/models/src", "grow": {"width": 0.5, "method": "subclone"}}
    prov["command"] = "growkit run recipes/half.yaml --source /models/src"
    prov["source"]["license"] = "mit"  # an explicit license wins over the source README
    card = ModelCard.load(write_model_card(tmp_path, prov, title="half-gpt2"))
    assert card.data.license == "mit"
    assert "model-shrinking" in card.data.tags
    assert card.text.startswith("\n# half-gpt2\n") or card.text.lstrip().startswith("# half-gpt2\n")
    assert "was shrunk zero-shot from `openai-community/gpt2`" in card.text
    assert "```yaml\nsource: /models/src\ngrow:\n  width: 0.5\n  method: subclone\n```" in card.text
    assert "growkit run recipes/half.yaml --source /models/src" in card.text


def test_grow_writes_the_card_into_its_output(tmp_path, tiny_gpt2):
    """The core writer calls write_model_card inside its temporary directory; the card must survive the rename and
    must not be titled after the temporary directory."""
    from growkit.pipeline import grow

    result = grow(tiny_gpt2, tmp_path / "grown", width=2, verify=True, quiet=True, base_model="acme/tiny")
    card = ModelCard.load(result.out_dir / "README.md")
    assert card.data.base_model == "acme/tiny" and card.data.license == "apache-2.0"
    assert card.text.strip().splitlines()[0] == "# acme/tiny, grown with growkit (clone)"
    assert ".growkit-tmp" not in card.text
    assert "| hidden | 32 | 64 | 2x |" in card.text and "| heads | 4 | 8 | 2x |" in card.text
    dlogits = result.provenance["verification"]["max_abs_dlogits"]
    assert dlogits < 1e-5 and f"- max \\|Δlogits\\|: {dlogits:.3g}" in card.text


@pytest.mark.parametrize("bad", ["---\nlicense: [unclosed\n---\n", "no front matter at all\n"])
def test_broken_source_readme_does_not_stop_the_card(tmp_path, bad):
    src = tmp_path / "src"
    src.mkdir()
    (src / "README.md").write_text(bad)
    prov = copy.deepcopy(provenance(str(src)))
    card = ModelCard.load(write_model_card(tmp_path, prov))
    assert card.data.license is None
