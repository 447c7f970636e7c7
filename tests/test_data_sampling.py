"""Phantom generator and patch sampler: determinism, structure, foreground oversampling."""

import numpy as np

from jaxseg.data import pipeline, sampling, synthetic


def test_phantom_is_deterministic_and_has_every_class():
  a_img, a_lab = synthetic.make_phantom(3, 1, (32, 32, 32))
  b_img, b_lab = synthetic.make_phantom(3, 1, (32, 32, 32))
  np.testing.assert_array_equal(a_img, b_img)
  np.testing.assert_array_equal(a_lab, b_lab)
  c_img, _ = synthetic.make_phantom(4, 1, (32, 32, 32))
  assert np.abs(a_img - c_img).max() > 10
  assert set(np.unique(a_lab)) == {0, 1, 2, 3}
  # Not a single threshold: the best intensity window [lo, hi) over a grid of quantiles gives
  # each organ a Dice far below what a segmentation model reaches.
  q = np.percentile(a_img[a_img > -300], np.linspace(0, 100, 41))
  windows = [(a_img >= lo) & (a_img < hi) for i, lo in enumerate(q) for hi in q[i + 1:]]
  def best_window_dice(ref):
    return max(2 * (w & ref).sum() / (w.sum() + ref.sum()) for w in windows)
  assert best_window_dice(a_lab == 1) < 0.85  # liver
  assert best_window_dice(a_lab == 3) < 0.6  # spleen


def test_phantom_cache_is_reused_and_atomic(tmp_path):
  a = synthetic.load_phantoms(num_cases=2, shape=(16, 16, 16), seed=1, cache_dir=tmp_path)
  files = list(tmp_path.glob("*.npz"))
  assert len(files) == 1 and not list(tmp_path.glob(".tmp_*"))
  b = synthetic.load_phantoms(num_cases=2, shape=(16, 16, 16), seed=1, cache_dir=tmp_path)
  np.testing.assert_array_equal(a[0], b[0])
  files[0].write_bytes(b"truncated")  # a corrupt cache is regenerated, not trusted
  c = synthetic.load_phantoms(num_cases=2, shape=(16, 16, 16), seed=1, cache_dir=tmp_path)
  np.testing.assert_array_equal(a[1], c[1])


def test_sampler_foreground_rate_and_determinism():
  rng = np.random.default_rng(0)
  labels = [np.zeros((40, 40, 40), np.uint8) for _ in range(3)]
  for lb in labels:
    lb[5:8, 30:33, 10:12] = 1  # tiny foreground: random patches rarely contain it
  images = [rng.normal(size=(1, 40, 40, 40)).astype(np.float32) for _ in range(3)]
  s = sampling.PatchSampler(images, labels, patch_size=(8, 8, 8), foreground_fraction=0.33, seed=0)
  hits = np.zeros(6)
  for step in range(200):
    b = s.batch(step, 6)
    hits += (b["label"].reshape(6, -1).max(1) > 0)
  # nnU-Net's count: from index round(6 * 0.67) = 4 on, the last two are centred on foreground.
  assert hits[4] == hits[5] == 200
  assert hits[:4].mean() < 20
  np.testing.assert_array_equal(s.batch(7, 6)["image"], s.batch(7, 6)["image"])
  # Each process can draw its own share: examples are independent of the others drawn.
  np.testing.assert_array_equal(s.batch(7, 6, range(3, 6))["image"], s.batch(7, 6)["image"][3:])


def test_forced_foreground_count_is_nnunets():
  # nnU-Net forces example i when not i < round(batch * (1 - 0.33)).
  assert [sampling.forced_foreground(b, 0.33) for b in (1, 2, 3, 4, 6, 7, 10, 12)] == \
      [0, 1, 1, 1, 2, 2, 3, 4]
  assert sampling.forced_foreground(4, 1.0) == 4 and sampling.forced_foreground(4, 0.0) == 0
  # A batch of 4: only the last example is forced (ceil(0.33 * 4) would force two).
  labels = [np.zeros((40, 40, 40), np.uint8)]
  labels[0][5:8, 30:33, 10:12] = 1
  s = sampling.PatchSampler([np.zeros((1, 40, 40, 40), np.float32)], labels, patch_size=(8, 8, 8),
                            foreground_fraction=0.33, seed=0)
  hits = sum((s.batch(step, 4)["label"].reshape(4, -1).max(1) > 0) for step in range(100))
  assert hits[3] == 100 and hits[2] < 20


def test_sampler_pads_small_cases_and_cuts_2d_slices():
  images = [np.ones((2, 10, 12, 5), np.float32)]
  labels = [np.ones((10, 12, 5), np.uint8)]
  s = sampling.PatchSampler(images, labels, patch_size=(16, 8), foreground_fraction=0.5, seed=0)
  b = s.batch(0, 4)
  assert b["image"].shape == (4, 16, 8, 2) and b["label"].shape == (4, 16, 8)
  # 10 rows padded to 16 (3 above, 3 below) with label 0.
  assert (b["label"][:, :3] == 0).all() and (b["label"][:, 3:13] == 1).all()


def test_seeded_split_is_deterministic_and_disjoint():
  ids = [f"c{i}" for i in range(10)]
  tr, va = pipeline.seeded_split(ids, num_val=3, seed=5)
  assert (tr, va) == pipeline.seeded_split(ids, num_val=3, seed=5)
  assert len(va) == 3 and not set(tr) & set(va) and set(tr) | set(va) == set(ids)
  assert pipeline.seeded_split(ids, num_val=3, seed=6) != (tr, va)
