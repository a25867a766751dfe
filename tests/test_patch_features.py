"""Patch features equal SimpleNet's reference pipeline (PatchMaker + MeanMapper + Aggregator)."""

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="parity tests need the [test] extra (torch)")
F = torch.nn.functional

from adjax.backbones import patch_features as pf  # noqa: E402


def _reference(maps, pretrain_dim, target_dim, patch_size=3):
  """A direct torch re-statement of the official steps, on NCHW tensors."""
  pad = (patch_size - 1) // 2
  unfold = torch.nn.Unfold(kernel_size=patch_size, stride=1, padding=pad)
  grids, features = [], []
  for x in maps:
    b, c, h, w = x.shape
    patches = unfold(x).reshape(b, c, patch_size, patch_size, h * w).permute(0, 4, 1, 2, 3)
    grids.append((h, w))
    features.append(patches)
  ref_h, ref_w = grids[0]
  for i in range(1, len(features)):
    b = features[i].shape[0]
    h, w = grids[i]
    f = features[i].reshape(b, h, w, *features[i].shape[2:]).permute(0, 3, 4, 5, 1, 2)
    base = f.shape
    f = F.interpolate(f.reshape(-1, 1, h, w), size=(ref_h, ref_w), mode="bilinear", align_corners=False)
    f = f.reshape(*base[:-2], ref_h, ref_w).permute(0, 4, 5, 1, 2, 3)
    features[i] = f.reshape(b, -1, *f.shape[-3:])
  features = [f.reshape(-1, *f.shape[-3:]) for f in features]
  pooled = [F.adaptive_avg_pool1d(f.reshape(len(f), 1, -1), pretrain_dim).squeeze(1) for f in features]
  stacked = torch.stack(pooled, dim=1).reshape(len(pooled[0]), 1, -1)
  out = F.adaptive_avg_pool1d(stacked, target_dim).reshape(-1, target_dim)
  return out.reshape(maps[0].shape[0], ref_h, ref_w, target_dim).numpy()


@pytest.mark.parametrize("channels,sizes,dims", [
    ((16, 32), ((12, 10), (6, 5)), (48, 48)),     # divisible: WRN50-like shape ratios
    ((40, 112), ((15, 13), (8, 7)), (256, 200)),  # Lite0-like, odd grids, non-divisible bins
    ((8,), ((9, 9),), (100, 64)),                 # one layer, upsampling bins
])
def test_patch_features_match_reference(channels, sizes, dims):
  rng = np.random.default_rng(0)
  maps = [rng.normal(size=(2, h, w, c)).astype(np.float32) for c, (h, w) in zip(channels, sizes)]
  ours = np.asarray(pf.patch_features(maps, *dims))
  theirs = _reference([torch.from_numpy(m.transpose(0, 3, 1, 2)) for m in maps], *dims)
  assert ours.shape == theirs.shape
  np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("n,m", [(4608, 1536), (360, 1536), (9216, 1536), (7, 3), (10, 4)])
def test_adaptive_avg_pool_matches_torch(n, m):
  x = np.random.default_rng(n).normal(size=(3, n)).astype(np.float32)
  expected = F.adaptive_avg_pool1d(torch.from_numpy(x)[:, None], m)[:, 0].numpy()
  np.testing.assert_allclose(np.asarray(pf.adaptive_avg_pool_last(x, m)), expected, rtol=1e-5, atol=1e-5)
