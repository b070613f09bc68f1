"""What the fused families (Phi-3, OLMo2) add to the vocabulary, beyond the family x operator matrix: a reader dim
made of sections."""

from __future__ import annotations

import torch

from growkit.apply import ApplyOptions, apply_tensor
from growkit.arch.spec import HEAD_DIM, HIDDEN, KV_HEADS, QGROUP, Dim, TensorSpec
from growkit.maps import AxisMap, GrowthMaps


def test_a_reader_made_of_sections_keeps_each_sections_sums_under_symmetric_noise():
    # A reader of q (kv x qgroup x head_dim) then k (kv x head_dim): each section's copies of a source column must sum
    # back to it (reader scale 1/m, noise cancelling over that section's copies only), whatever the other section.
    sizes = {HIDDEN: 3, KV_HEADS: 2, QGROUP: 2, HEAD_DIM: 2}
    spec = TensorSpec("w.{}", (Dim((HIDDEN,), "out"), Dim.concat(((KV_HEADS, QGROUP, HEAD_DIM), (KV_HEADS, HEAD_DIM)),
                                                                  "in")), per_layer=True)
    clone = {k: AxisMap(n, torch.arange(2 * n) % n) for k, n in ((KV_HEADS, 2), (QGROUP, 2))}
    maps = GrowthMaps(hidden=AxisMap.identity(3), per_layer={(k, 0): m for k, m in clone.items()}, layer_src=[0])
    x = torch.randn(3, 8 + 4, generator=torch.Generator().manual_seed(0))
    y = apply_tensor(x, spec, 0, sizes, maps, ApplyOptions(tied=False, rms_norm=True, noise_snr_db=0.0))
    q, k = y[:, :32].reshape(3, 2, 2, 2, 2, 2), y[:, 32:].reshape(3, 2, 2, 2)  # [hidden, kv copy, kv, (qg copy, qg,) hd]
    assert torch.allclose(q.sum((1, 3)), x[:, :8].reshape(3, 2, 2, 2), atol=1e-6)
    assert torch.allclose(k.sum(1), x[:, 8:].reshape(3, 2, 2), atol=1e-6)
    assert not torch.allclose(q[:, 0], q[:, 1])  # the noise is there: the copies differ
