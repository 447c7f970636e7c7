"""jaxseg.data.loader: the same patches as PatchSampler, read from memmaps patch by patch, served
ahead by grain workers; the cache's stored foreground points; the default path uses it."""

import pickle

import numpy as np
import pytest

from jaxseg.data import loader, sampling


def _cases(rng, shapes, fg=0.5, channels=2):
  images = [rng.normal(size=(channels,) + s).astype(np.float32) for s in shapes]
  labels = [(rng.random(s) < fg).astype(np.uint8) * rng.integers(1, 3, s).astype(np.uint8)
            for s in shapes]
  return images, labels


def _assert_batches_equal(a, b):
  assert a.keys() == b.keys()
  for k in a:
    assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
    np.testing.assert_array_equal(a[k], b[k])


@pytest.mark.parametrize("patch", [(16, 16, 16), (32, 48, 8), (16, 8)])
def test_patch_source_equals_patch_sampler(patch):
  # Cases larger and smaller than the patch (padded per crop), one with more voxels of a class
  # than MAX_FG_POINTS (the run-seeded subsample of PatchSampler), 2D slices of 3D cases.
  images, labels = _cases(np.random.default_rng(0), [(30, 40, 20), (10, 12, 5), (48, 48, 48)])
  assert (labels[2] == 1).sum() > sampling.MAX_FG_POINTS
  old = sampling.PatchSampler(images, labels, patch_size=patch, foreground_fraction=0.5, seed=3)
  new = loader.PatchSource(images, labels, patch_size=patch, foreground_fraction=0.5, seed=3)
  for step in range(40):
    _assert_batches_equal(old.batch(step, 4), new.batch(step, 4))
  _assert_batches_equal(old.batch(7, 4, [1, 3]), new.batch(7, 4, [1, 3]))


class _Recording:
  """An array that records the regions read from it."""

  def __init__(self, array):
    self.array, self.reads = array, []
    self.shape = array.shape

  def __getitem__(self, index):
    self.reads.append(index)
    return self.array[index]


def test_crop_reads_only_the_patch_and_pads_per_crop():
  image = np.arange(2 * 6 * 7 * 8, dtype=np.float32).reshape(2, 6, 7, 8)
  label = (np.arange(6 * 7 * 8).reshape(6, 7, 8) % 3).astype(np.int16)
  rec_image, rec_label = _Recording(image), _Recording(label)
  out_image = np.empty((4, 4, 10, 2), np.float32)
  out_label = np.empty((4, 4, 10), np.int32)
  loader.crop_into(out_image, out_label, rec_image, rec_label, (3, -2, -1), fill=-5.0)
  assert rec_image.reads == [(slice(None), slice(3, 6), slice(0, 2), slice(0, 8))]
  assert rec_label.reads == [(slice(3, 6), slice(0, 2), slice(0, 8))]
  padded = np.pad(image, [(0, 0), (0, 1), (2, 5), (1, 1)], constant_values=-5.0)
  np.testing.assert_array_equal(np.moveaxis(out_image, -1, 0), padded[:, 3:7, 0:4, 0:10])
  padded_label = np.pad(label, [(0, 1), (2, 5), (1, 1)])
  np.testing.assert_array_equal(out_label, padded_label[3:7, 0:4, 0:10])


def _memmapped(tmp_path, images, labels):
  for i, (im, lb) in enumerate(zip(images, labels)):
    np.save(tmp_path / f"{i}.image.npy", im)
    np.save(tmp_path / f"{i}.label.npy", lb.astype(np.int16))
  return ([np.load(tmp_path / f"{i}.image.npy", mmap_mode="r") for i in range(len(images))],
          [np.load(tmp_path / f"{i}.label.npy", mmap_mode="r") for i in range(len(images))])


def test_memmapped_cases_with_stored_points(tmp_path):
  images, labels = _cases(np.random.default_rng(1), [(30, 40, 20), (10, 12, 5), (48, 48, 48)])
  mm_images, mm_labels = _memmapped(tmp_path, images, labels)
  located = [sampling.foreground_points(lb, rng=np.random.default_rng([i, 5]))
             for i, lb in enumerate(labels)]
  metas = [loader.CaseMeta(pts, float(im.min()), classes)
           for im, (pts, classes) in zip(images, located)]
  # Stored points (nnU-Net's class_locations): every voxel of a small case, grouped by class in
  # C order; a seeded sample of MAX_FG_POINTS of each class of a large one that has more.
  np.testing.assert_array_equal(metas[0].fg_points,
                                np.concatenate([np.argwhere(labels[0] == c) for c in (1, 2)]))
  np.testing.assert_array_equal(metas[0].fg_classes,
                                np.repeat([1, 2], [(labels[0] == c).sum() for c in (1, 2)]))
  for c in (1, 2):
    pts = metas[2].fg_points[metas[2].fg_classes == c]
    assert len(pts) == sampling.MAX_FG_POINTS < (labels[2] == c).sum()
    assert (labels[2][tuple(pts.T)] == c).all()
    assert len(np.unique(pts, axis=0)) == len(pts)
  new = loader.PatchSource(mm_images, mm_labels, patch_size=(16, 16, 16), foreground_fraction=0.5,
                           seed=3, metas=metas)
  # The cases travel by file name: nothing is loaded, and a pickle (to grain worker processes)
  # carries the index (the points), not the voxels.
  assert all(v.array is None and v.path for v in new.images + new.labels)
  assert len(pickle.dumps(new)) < sum(m.fg_points.nbytes for m in metas) + 10_000
  # PatchSampler (in-memory, padded) cuts the same patches once it has the stored points
  # (in its padded coordinates); only the choice of points differs between them.
  old = sampling.PatchSampler(images, labels, patch_size=(16, 16, 16), foreground_fraction=0.5,
                              seed=3)
  old.fg_points = [m.fg_points + np.maximum(16 - np.array(lb.shape), 0) // 2
                   for m, lb in zip(metas, labels)]
  old.fg_groups = [sampling.class_groups(m.fg_classes) for m in metas]
  for step in range(30):
    _assert_batches_equal(old.batch(step, 4), new.batch(step, 4))


def test_float16_cases_give_the_float32_batches_rounded(tmp_path):
  # A cache stored in float16 (benchmarks/pipeline.py --store-dtype): the same patches, the
  # image in float16 (the float32 batch rounded, padding included); the labels unchanged.
  images, labels = _cases(np.random.default_rng(4), [(30, 40, 20), (10, 12, 5)])
  half, mm_labels = _memmapped(tmp_path, [im.astype(np.float16) for im in images], labels)
  full = loader.PatchSource(images, labels, patch_size=(16, 16, 16), foreground_fraction=0.5, seed=3)
  new = loader.PatchSource(half, mm_labels, patch_size=(16, 16, 16), foreground_fraction=0.5, seed=3)
  for step in range(10):
    a, b = full.batch(step, 4), new.batch(step, 4)
    assert b["image"].dtype == np.float16 and b["label"].dtype == np.int32
    np.testing.assert_array_equal(b["image"], a["image"].astype(np.float16))
    np.testing.assert_array_equal(b["label"], a["label"])


def test_mapped_labels_map_what_they_read(tmp_path):
  images, labels = _cases(np.random.default_rng(2), [(20, 20, 20)])
  labels = [np.where(labels[0] == 2, 4, labels[0])]  # BraTS-like values 0, 1, 4
  mm_images, mm_labels = _memmapped(tmp_path, images, labels)
  lut = np.zeros(5, np.int16)
  lut[[0, 1, 4]] = [0, 1, 2]
  mapped = loader.MappedLabel(mm_labels[0], lut)
  np.testing.assert_array_equal(np.asarray(mapped), lut[labels[0]])
  np.testing.assert_array_equal(mapped[3:5, :, 2], lut[labels[0][3:5, :, 2]])
  src = loader.PatchSource(mm_images, [mapped], patch_size=(16, 16, 16), foreground_fraction=0.5,
                           seed=0)
  ref = sampling.PatchSampler(images, [lut[labels[0]]], patch_size=(16, 16, 16),
                              foreground_fraction=0.5, seed=0)
  for step in range(10):
    _assert_batches_equal(ref.batch(step, 2), src.batch(step, 2))


def test_bad_cases_raise_naming_the_file(tmp_path):
  images, labels = _cases(np.random.default_rng(3), [(10, 10, 10)])
  mm_images, _ = _memmapped(tmp_path, images, labels)
  with pytest.raises(ValueError, match=r"0\.image\.npy.*do not match"):
    loader.PatchSource(mm_images, [np.zeros((10, 10, 9), np.int16)], patch_size=(8, 8, 8),
                       foreground_fraction=0.3, seed=0)
  src = loader.PatchSource(mm_images, [labels[0]], patch_size=(8, 8, 8), foreground_fraction=0.3,
                           seed=0)
  (tmp_path / "0.image.npy").unlink()
  with pytest.raises(OSError, match=r"0\.image\.npy"):
    src.batch(0, 2)


@pytest.mark.parametrize("processes", [False, True], ids=["threads", "processes"])
def test_batch_loader_serves_the_source_batches(tmp_path, processes):
  images, labels = _cases(np.random.default_rng(4), [(24, 24, 24), (20, 30, 16)])
  mm_images, mm_labels = _memmapped(tmp_path, images, labels)
  src = loader.PatchSource(mm_images, mm_labels, patch_size=(16, 16, 16), foreground_fraction=0.5,
                           seed=1)
  bl = loader.BatchLoader(src, 4, range(2, 4), workers=2, prefetch=3, processes=processes,
                          num_steps=20)
  try:
    # In order, then a jump back (a resume) or forward: each restarts the pipeline there.
    order = [0, 1, 2, 9, 10] if processes else [0, 1, 2, 3, 9, 10, 4]
    for step in order:
      _assert_batches_equal(bl(step, range(2, 4)), src.batch(step, 4, [2, 3]))
    assert bl.restarts == (2 if processes else 3) and bl.served == len(order) and bl.wait_s > 0
    # Another share is cut synchronously, not from the pipeline.
    _assert_batches_equal(bl(5, range(0, 2)), src.batch(5, 4, [0, 1]))
    assert bl.served == len(order)
  finally:
    bl.close()


def test_loader_wait_is_small_once_warm():
  images, labels = _cases(np.random.default_rng(5), [(24, 24, 24)] * 3)
  src = loader.PatchSource(images, labels, patch_size=(16, 16, 16), foreground_fraction=0.5, seed=1)
  bl = loader.BatchLoader(src, 2, range(2), workers=1, prefetch=8)
  import time
  bl(0, range(2))
  time.sleep(0.5)  # a "train step": the workers fill the buffer meanwhile
  warm = bl.wait_s
  for step in range(1, 6):
    bl(step, range(2))
  bl.close()
  assert (bl.wait_s - warm) / 5 < 0.01, bl.wait_s - warm


def test_default_training_path_uses_the_loader(tmp_path):
  import helpers
  import unet3d
  from jaxseg import train
  config = helpers.tiny(unet3d.get_config(), tmp_path, batch=3)
  t = train.setup(config)
  assert isinstance(t.batch_fn, loader.BatchLoader)
  assert t.batch_fn.indices == (0, 1, 2) and t.batch_fn.num_steps == config.train.num_steps
  # The phantoms' batches are PatchSampler's (the sampler train.setup used before).
  old = sampling.PatchSampler(t.data.train_images, t.data.train_labels,
                              patch_size=config.data.patch_size,
                              foreground_fraction=config.data.foreground_fraction, seed=config.seed)
  for step in (0, 1, 2):
    _assert_batches_equal(t.batch_fn(step, range(3)), old.batch(step, 3))
  batch = t.batch(3)
  np.testing.assert_array_equal(np.asarray(batch["image"]), old.batch(3, 3)["image"])
  t.batch_fn.close()


def test_foreground_patches_pick_a_class_uniformly_then_a_voxel():
  # nnU-Net's oversampling: a class drawn uniformly among the case's foreground classes, then one
  # of its voxels. Class 2 has 8 voxels against class 1's 4000: a voxel drawn uniformly over the
  # foreground would land on it 0.2% of the time; a class drawn first, half of the time.
  label = np.zeros((20, 20, 20), np.uint8)
  label[:10] = 1
  label[15, 15, 15:19] = label[16, 15, 15:19] = 2
  image = np.zeros((1,) + label.shape, np.float32)
  for source in (sampling.PatchSampler([image], [label], patch_size=(1, 1, 1),
                                       foreground_fraction=1.0, seed=0),
                 loader.PatchSource([image], [label], patch_size=(1, 1, 1),
                                    foreground_fraction=1.0, seed=0)):
    centres = np.concatenate([source.batch(step, 4)["label"].ravel() for step in range(200)])
    assert set(np.unique(centres)) == {1, 2}
    assert 0.43 < (centres == 2).mean() < 0.57  # 800 draws: 0.5 +- 4.9 standard deviations


@pytest.mark.parametrize("patch,context", [((16, 16, 16), (22, 20, 30)), ((16, 8), (24, 10))])
def test_context_surrounds_the_same_patch_and_both_samplers_cut_it(patch, context):
  # The context cut is the patch drawn without context, where it was drawn, plus its
  # surroundings: the case's voxels where the case has them, its minimum and label 0 outside.
  images, labels = _cases(np.random.default_rng(4), [(30, 40, 20), (10, 12, 5), (40, 36, 24)])
  kw = dict(patch_size=patch, foreground_fraction=0.5, seed=5)
  plain = sampling.PatchSampler(images, labels, **kw)
  sampler = sampling.PatchSampler(images, labels, context=context, **kw)
  source = loader.PatchSource(images, labels, context=context, **kw)
  margin = [(c - p) // 2 for c, p in zip(context, patch)] + [0] * (3 - len(patch))
  centre = tuple(slice(m, m + p) for m, p in zip(margin, patch))
  for step in range(25):
    b = sampler.batch(step, 4)
    _assert_batches_equal(b, source.batch(step, 4))
    assert b["label"].shape == (4,) + context
    _assert_batches_equal({k: v[(slice(None),) + centre] for k, v in b.items()}, plain.batch(step, 4))
  # By hand for one example: the corner of its patch in the case, then the context around it.
  for step in range(10):
    for i in range(4):
      case, corner = source._draw(step, i, 4)
      im, lb = images[case], labels[case]
      lo = [a - m for a, m in zip(corner, margin)]
      want_im = np.full((2,) + tuple(p + 2 * m for p, m in zip(patch + (1,) * (3 - len(patch)), margin)),
                        im.min(), np.float32)
      want_lb = np.zeros(want_im.shape[1:], np.int32)
      src = tuple(slice(max(a, 0), min(a + n, s)) for a, n, s in zip(lo, want_lb.shape, lb.shape))
      dst = tuple(slice(s.start - a, s.stop - a) for s, a in zip(src, lo))
      want_im[(slice(None),) + dst] = im[(slice(None),) + src]
      want_lb[dst] = lb[src]
      if len(patch) == 2:
        want_im, want_lb = want_im[..., 0], want_lb[..., 0]
      got = sampler.batch(step, 4, [i])
      np.testing.assert_array_equal(got["image"][0], np.moveaxis(want_im, 0, -1))
      np.testing.assert_array_equal(got["label"][0], want_lb)
  with pytest.raises(ValueError, match="must hold patch_size"):
    sampling.PatchSampler(images, labels, context=(17, 16, 16), **dict(kw, patch_size=(16, 16, 16)))


def test_training_path_cuts_context_for_nnunets_spatial_augmentation(tmp_path):
  # With nnU-Net's augmentation (rotation and scaling on) the loader cuts the context around
  # each patch (16^3 -> 26^3: 16 x 1.366 / 0.85 = 25.7, floored, grown evenly) and the train
  # step hands the network the 16^3 centre; with mirroring only the loader cuts the patch.
  import jax
  import helpers  # puts configs/ on sys.path
  import common
  import unet3d
  from jaxseg import train
  from jaxseg.data import augment
  config = helpers.tiny(unet3d.get_config(), tmp_path, batch=2)
  with config.unlocked():
    config.augment = common.base_config().augment
  assert augment.context_size((16, 16, 16), augment.AugmentSettings.from_config(config.augment)) == (26,) * 3
  t = train.setup(config)
  batch = t.batch_fn(0, range(2))
  assert batch["image"].shape == (2, 26, 26, 26, 1) and batch["label"].shape == (2, 26, 26, 26)
  state, metrics = t.train_step(t.state, jax.device_put(batch), t.key)
  assert int(state.step) == 1 and np.isfinite(float(metrics["loss"]))
  t.batch_fn.close()
  plain = train.setup(helpers.tiny(unet3d.get_config(), tmp_path, batch=2))
  assert plain.batch_fn(0, range(2))["label"].shape == (2, 16, 16, 16)
  plain.batch_fn.close()
