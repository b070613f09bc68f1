"""What the fused families (Phi-3, OLMo2) add beyond the family x operator matrix: a reader dim made of sections,
how identity depth silences a post-norm block, config inference refused as the right family, and rc-sample's
fitted shrink on a fused projection."""

from __future__ import annotations

import pytest
import torch
from conftest import save_tiny
from safetensors.torch import load_file, save_file

from growkit import grow
from growkit.checkpoint.reader import load_checkpoint
from growkit.errors import GrowkitError
from growkit.apply import ApplyOptions, apply_tensor
from growkit.arch.spec import FFN, HEAD_DIM, HIDDEN, KV_HEADS, QGROUP, Dim, Sizes, TensorSpec
from growkit.maps import AxisMap, GrowthMaps, ReaderNoise
from growkit.pipeline import grown_tensors, plan_growth


@pytest.mark.parametrize("noise", ["asked", "operator"])
def test_a_reader_made_of_sections_keeps_each_sections_sums_under_symmetric_noise(noise):
    # A reader of q (kv x qgroup x head_dim) then k (kv x head_dim): each section's copies of a source column must sum
    # back to it (reader scale 1/m, noise cancelling over that section's copies only), whatever the other section.
    # The noise is asked (--noise-snr-db) or an operator's (rc-sample's reader noise on the kv heads' copies).
    sizes = Sizes(hidden=3, ffn=1, heads=4, kv_heads=2, layers=1, head_dim=2, vocab=1)  # query groups of 2
    spec = TensorSpec("w.{}", (Dim((HIDDEN,), "out"), Dim.concat(((KV_HEADS, QGROUP, HEAD_DIM), (KV_HEADS, HEAD_DIM)),
                                                                  "in")), per_layer=True)
    reader_noise = ReaderNoise(std={"w.0": 0.5}) if noise == "operator" else None
    clone = {KV_HEADS: AxisMap(2, torch.arange(4) % 2, reader_noise=reader_noise),
             QGROUP: AxisMap(2, torch.arange(4) % 2)}
    maps = GrowthMaps(hidden=AxisMap.identity(3), per_layer={(k, 0): m for k, m in clone.items()}, layer_src=[0])
    x = torch.randn(3, 8 + 4, generator=torch.Generator().manual_seed(0))
    opts = ApplyOptions(tied=False, rms_stream=True, noise_snr_db=0.0 if noise == "asked" else None)
    y = apply_tensor(x, spec, 0, sizes, maps, opts)
    # [hidden, kv copy, kv, (qgroup copy, qgroup,) head_dim]
    q, k = y[:, :32].reshape(3, 2, 2, 2, 2, 2), y[:, 32:].reshape(3, 2, 2, 2)
    assert torch.allclose(q.sum((1, 3)), x[:, :8].reshape(3, 2, 2, 2), atol=1e-6)
    assert torch.allclose(k.sum(1), x[:, 8:].reshape(3, 2, 2), atol=1e-6)
    assert not torch.allclose(q[:, 0], q[:, 1]) and not torch.allclose(k[:, 0], k[:, 1])  # the noise is there


@pytest.mark.parametrize("case,zero_gain", [("olmo2", 0.0), ("gemma2", -1.0)])  # Gemma2's gain is 1 + w
def test_identity_depth_silences_post_norm_blocks_by_their_norm_gains(tmp_path, case, zero_gain):
    # Zero rows feeding a post-norm would be exact too, but the norm turns the first step's tiny rows into a full-size
    # output; a zero gain grows from zero. The new layers copy their source's matrices.
    out = grow(save_tiny(case, tmp_path / "src"), tmp_path / "out", layers="2x", depth_method="identity",
               quiet=True).out_dir
    src, grown = load_file(tmp_path / "src" / "model.safetensors"), load_file(out / "model.safetensors")
    for new, old in ((1, 0), (3, 1)):  # identity copies interleaved after their source layers
        for name in ("post_attention_layernorm", "post_feedforward_layernorm"):
            assert (grown[f"model.layers.{new}.{name}.weight"] == zero_gain).all()
        for name in ("self_attn.o_proj", "mlp.down_proj"):
            assert torch.equal(grown[f"model.layers.{new}.{name}.weight"], src[f"model.layers.{old}.{name}.weight"])


@pytest.mark.parametrize("case,family", [("phi3", "phi3"), ("olmo2", "olmo2")])
def test_a_bare_file_without_config_is_refused_as_its_own_family(tmp_path, case, family):
    # Neither records the head count in a shape (fused qkv; q/k norms over heads x head_dim). OLMo2's q_proj and
    # q_norm names are Qwen3's too, whose per-head q_norm does give head_dim: read as Qwen3 it would be a wrong guess.
    src = load_file(save_tiny(case, tmp_path / "src") / "model.safetensors")
    save_file(src, tmp_path / "bare.safetensors")
    with pytest.raises(GrowkitError, match=f"cannot infer a {family} config: the tensor shapes do not say how many "
                                           "attention heads"):
        load_checkpoint(tmp_path / "bare.safetensors")


def test_rc_sample_shrink_mixes_each_section_of_a_fused_projection(tmp_path):
    # ffn 48 -> 24 by kde: every new gate row is the draw's mixture of the source gate rows, and every new up row the
    # same mixture of the source up rows (not of rows straddling the gate/up boundary).
    ckpt = load_checkpoint(save_tiny("phi3", tmp_path / "src"))
    growth = plan_growth(ckpt, method="rc-sample", direction="shrink", ffn=24, operator_options={"estimator": "kde"})
    out = {entry.name: t for entry, t in grown_tensors(growth, torch.float32)}
    name = "model.layers.1.mlp.gate_up_proj.weight"
    mixing = growth.maps.get(FFN, 1).mixing
    assert mixing is not None and not mixing.std  # kde's draws: combinations of source rows, no residual noise
    weights = mixing.weights.to(torch.float32)
    gate, up = ckpt.get(name).split(48)
    assert torch.allclose(out[name], torch.cat([weights @ gate, weights @ up]), atol=1e-5)
