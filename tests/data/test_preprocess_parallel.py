"""case_cache.preprocess_dataset: worker processes, progress, resume after kill -9, the
foreground points stored in the cache, and the real-data path handing them to the loader."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

import helpers  # noqa: F401  (puts configs/ on sys.path)
import unet3d
from jaxseg.data import dataset as ds
from jaxseg.data import loader, pipeline, real
from jaxseg.data import preprocess as pp
from jaxseg.data import case_cache
from jaxseg.errors import InvalidDatasetError
from tiny_datasets import write_case, write_dataset_json

REPO = pathlib.Path(__file__).resolve().parents[2]
SETTINGS = pp.PreprocessSettings(normalization=("zscore",), target_spacing=(1.0, 1.0, 1.5))


def _dataset(root, n, values=(0, 1, 2), bad_case=None):
  rng = np.random.default_rng(0)
  write_dataset_json(root, ["MR"], {f"l{v}" if v else "background": v for v in values})
  for i in range(n):
    image = rng.normal(100, 10, (14, 12, 10)) * (rng.random((14, 12, 10)) > 0.05)
    label = np.zeros((14, 12, 10))
    label[3:9, 2:8, 2:7] = rng.choice(values[1:], (6, 6, 5))
    if i == bad_case:
      label[0, 0, 0] = 7
    write_case(root, f"case{i:02d}", [image], label, np.diag([1.0, 1.0, 2.0, 1.0]))
  return ds.load_dataset_index(root)


def _entry_files(cache):
  return sorted(p.name for p in pathlib.Path(cache).glob("*.json"))


def test_parallel_equals_serial_and_reports_progress(tmp_path):
  index = _dataset(tmp_path / "Dataset950_P", 5)
  lines = []
  entries = case_cache.preprocess_dataset(index, index.cases, SETTINGS, tmp_path / "par", workers=2,
                                  log=lines.append, log_every_s=0.0)
  assert list(entries) == list(index.cases)
  for case in index.cases:
    image, label, record = pp.preprocess_case(*ds.load_case(index, case), SETTINGS)
    e = entries[case]
    assert isinstance(e.image, np.memmap)
    np.testing.assert_array_equal(e.image, image.astype(np.float16))
    np.testing.assert_array_equal(e.label, label)
    assert e.record == record
    # The stored index: every foreground voxel (fewer than MAX_FG_POINTS here) by class, and the
    # minimum.
    np.testing.assert_array_equal(e.meta.fg_points, _by_class(label)[0])
    np.testing.assert_array_equal(e.meta.fg_classes, _by_class(label)[1])
    assert e.meta.image_min == float(image.astype(np.float16).min())
  assert lines[-1].startswith("preprocessing Dataset950_P: 5/5 cases (0 already cached) |")
  assert "cases/s | ETA 0.0 min | 2 worker(s)" in lines[-1]
  # Everything cached: nothing is computed again, nothing logged.
  lines.clear()
  again = case_cache.preprocess_dataset(index, index.cases, SETTINGS, tmp_path / "par", workers=2,
                                log=lines.append)
  assert not lines and all(np.array_equal(again[c].image, entries[c].image) for c in index.cases)


def test_a_worker_error_names_the_file(tmp_path):
  index = _dataset(tmp_path / "Dataset951_Bad", 3, bad_case=1)
  with pytest.raises(InvalidDatasetError, match=r"labelsTr/case01\.nii\.gz has label values \[7\]"):
    case_cache.preprocess_dataset(index, index.cases, SETTINGS, tmp_path / "c", workers=2, log=lambda m: None)


_KILLED = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {tests!r})
    from jaxseg.data import case_cache, dataset as ds, preprocess as pp
    compute = pp.preprocess_case
    def slow(*a, **k):
      time.sleep(0.4)
      return compute(*a, **k)
    pp.preprocess_case = slow
    index = ds.load_dataset_index({root!r})
    settings = pp.PreprocessSettings(normalization=("zscore",), target_spacing=(1.0, 1.0, 1.5))
    case_cache.preprocess_dataset(index, index.cases, settings, {cache!r}, workers=1)
""")


def test_resumes_after_kill_9(tmp_path, monkeypatch):
  root, cache = tmp_path / "Dataset952_K", tmp_path / "cache"
  index = _dataset(root, 8)
  code = _KILLED.format(tests=str(REPO / "tests"), root=str(root), cache=str(cache))
  env = dict(os.environ, PYTHONPATH=str(REPO))
  proc = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE)
  deadline = time.time() + 120
  while len(_entry_files(cache)) < 2 and time.time() < deadline and proc.poll() is None:
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  done = _entry_files(cache)
  assert proc.returncode == -9 and 2 <= len(done) < 8, (done, proc.stderr.read()[-2000:])
  computed = []
  original = case_cache._compute_entry  # noqa: SLF001

  def counting(index, case_id, *args):
    computed.append(case_id)
    return original(index, case_id, *args)
  monkeypatch.setattr(case_cache, "_compute_entry", counting)
  entries = case_cache.preprocess_dataset(index, index.cases, SETTINGS, cache, workers=1, log=lambda m: None)
  assert len(computed) == 8 - len(done) and not set(computed) & {f.split("_")[0] for f in done}
  assert len(_entry_files(cache)) == 8 and not list(cache.glob(".*tmp-*"))
  for case in index.cases:
    image, label, _ = pp.preprocess_case(*ds.load_case(index, case), SETTINGS)
    np.testing.assert_array_equal(entries[case].image, image.astype(np.float16))
    np.testing.assert_array_equal(entries[case].label, label)


def test_entries_from_before_the_index_get_it_added(tmp_path):
  index = _dataset(tmp_path / "Dataset953_Old", 1)
  cache = tmp_path / "cache"
  first = case_cache.cached_entry(index, "case00", SETTINGS, cache)
  (meta_path,) = cache.glob("*.json")
  meta = json.loads(meta_path.read_text())
  del meta["image_min"]
  meta_path.write_text(json.dumps(meta))
  next(cache.glob("*.fg.npy")).unlink()
  again = case_cache.cached_entry(index, "case00", SETTINGS, cache)
  np.testing.assert_array_equal(again.meta.fg_points, first.meta.fg_points)
  assert again.meta.image_min == first.meta.image_min
  assert "image_min" in json.loads(meta_path.read_text()) and list(cache.glob("*.fg.npy"))


def _by_class(label):
  """Every label > 0 voxel grouped by class (ascending), C order within one; their classes."""
  classes = [c for c in np.unique(label) if c > 0]
  return (np.concatenate([np.argwhere(label == c) for c in classes]),
          np.repeat(classes, [(label == c).sum() for c in classes]))


def test_real_data_hands_the_stored_points_to_the_loader(tmp_path):
  # Label values 0, 1, 4 (not contiguous): labels are mapped on read, not loaded.
  root = tmp_path / "Dataset954_R"
  _dataset(root, 5, values=(0, 1, 4))
  c = unet3d.get_config()
  with c.unlocked():
    c.data.root, c.data.cache_dir, c.data.fold = str(root), str(tmp_path / "cache"), 0
  data = pipeline.load_cases(c)
  assert len(data.train_meta) == len(data.train_ids) == 4
  for im, lb, meta in zip(data.train_images, data.train_labels, data.train_meta):
    assert isinstance(im, np.memmap) and isinstance(lb, loader.MappedLabel)
    assert set(np.unique(np.asarray(lb))) <= {0, 1, 2}
    np.testing.assert_array_equal(meta.fg_points, _by_class(np.asarray(lb))[0])
  src = loader.PatchSource(data.train_images, data.train_labels, patch_size=(8, 8, 8),
                           foreground_fraction=0.5, seed=0, metas=data.train_meta)
  assert all(v.path for v in src.images + src.labels)
  b = src.batch(0, 2)
  assert b["label"].max() <= 2 and (b["label"][1] > 0).any()  # the second is foreground-centred
  assert real.prepare(c).metas.keys() == set(ds.load_dataset_index(root).cases)
