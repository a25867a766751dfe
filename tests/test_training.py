"""Shared gradient training: loss goes down, data parallelism, exact resume, feature caching."""

import json
import os
import socket
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from adjax import caches, compile_ahead, evaluate, train
from adjax.methods import rsad, simplenet
from configs import rsad as rsad_config
from configs import simplenet as simplenet_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class ArraySource:
  """A caches.TrainingSet over fixed random features (what the cache would hold)."""

  def __init__(self, features, fail_in_epoch=None):
    self.features, self.records, self.fail_in_epoch = features, list(range(len(features))), fail_in_epoch
    self.calls = 0

  def epoch(self, order, batch_size):
    self.calls += 1
    if self.fail_in_epoch is not None and self.calls > self.fail_in_epoch:
      raise KeyboardInterrupt("simulated kill")
    for start in range(0, len(order), batch_size):
      idx = order[start:start + batch_size]
      yield {"features": self.features[idx], "subclass": np.zeros(len(idx), np.int32)}


def tiny_config(module, variant=""):
  c = module.get_config(variant)
  c.train.epochs, c.train.batch_size, c.train.checkpoint_every, c.train.log_every = 4, 4, 1, 100
  c.train.checkpoint_min_seconds = 0.0  # every epoch: the resume tests interrupt between them
  if hasattr(c.model, "dsc_hidden"):
    c.model.dsc_hidden = tuple(32 for _ in c.model.dsc_hidden)
  return c


def features(n=10, size=4, channels=16, seed=0):
  return np.random.default_rng(seed).normal(0, 0.3, size=(n, size, size, channels)).astype(np.float32)


@pytest.mark.parametrize("cls,config_module,variant", [
    (simplenet.SimpleNet, simplenet_config, ""), (rsad.RSAD, rsad_config, ""), (rsad.RSAD, rsad_config, "aligner=fc")])
def test_one_train_step_reduces_the_loss(cls, config_module, variant):
  method = cls(tiny_config(config_module, variant))
  f = features()
  state = method.init({"features": f[:1]}, jax.random.key(0))
  batch = {"features": f, "subclass": np.zeros(len(f), np.int32)}
  key = jax.random.key(3)
  before = method.loss_fn(state["params"], state["batch_stats"], f, key)[0]
  new_state, _ = jax.jit(method.train_step)(state, batch, key)
  after = method.loss_fn(new_state["params"], state["batch_stats"], f, key)[0]
  assert float(after) < float(before)


def _train(config, source, workdir, seed=0):
  method = simplenet.SimpleNet(config)
  state = method.init({"features": source.features[:1]}, jax.random.key(seed))
  step = train.make_train_step(method, method.normalisation(None))
  return train.train_gradient(config, step, source, state, jax.random.key(seed + 1), str(workdir), "cat")


def _flat(state):
  return jax.tree.leaves(jax.device_get(state["params"]))


# Biases that feed a BatchNorm have an exactly zero gradient (the norm removes any constant
# shift), so Adam turns float rounding noise into +-lr steps there: two runs that differ only
# in summation order (device count, batch composition of the frozen features) drift apart in
# these leaves alone. Every other parameter must agree tightly.
ZERO_GRADIENT_LEAVES = {"adaptor/fc0/bias", "discriminator/fc0/bias"}


def assert_same_training(a: dict, b: dict):
  """a, b: flattened {'path': array} parameters of two runs of SimpleNet."""
  compared = sorted(set(a) - ZERO_GRADIENT_LEAVES)
  assert "discriminator/fc0/kernel" in compared and "adaptor/fc0/kernel" in compared
  for key in compared:
    np.testing.assert_allclose(a[key], b[key], rtol=1e-4, atol=1e-6, err_msg=key)


def _named(state):
  from flax import traverse_util
  return traverse_util.flatten_dict(jax.device_get(state["params"]), sep="/")


def test_checkpoints_keep_a_minimum_interval_and_the_last_epoch_is_always_saved(tmp_path):
  from adjax import configlib
  from adjax.errors import ConfigError
  config = tiny_config(simplenet_config)  # checkpoint_every 1, 4 epochs
  f = features()
  config.train.checkpoint_min_seconds = 3600.0
  _train(config, ArraySource(f), tmp_path / "spaced")
  assert sorted(os.listdir(tmp_path / "spaced" / "checkpoints" / "cat")) == ["3"]
  config.train.checkpoint_min_seconds = 0.0
  _train(config, ArraySource(f), tmp_path / "every")
  assert sorted(os.listdir(tmp_path / "every" / "checkpoints" / "cat")) == ["2", "3"]  # max_to_keep 2
  for key, value in (("checkpoint_min_seconds", -1.0), ("checkpoint_every", 0)):
    bad = tiny_config(simplenet_config)
    bad.train[key] = value
    with pytest.raises(ConfigError, match=f"train.{key}"):
      configlib.validate(bad)


def test_interrupted_run_resumes_to_the_same_parameters(tmp_path):
  config = tiny_config(simplenet_config)
  f = features()
  uninterrupted = _train(config, ArraySource(f), tmp_path / "a")
  with pytest.raises(KeyboardInterrupt):
    _train(config, ArraySource(f, fail_in_epoch=2), tmp_path / "b")  # dies inside epoch 3
  assert sorted(os.listdir(tmp_path / "b" / "checkpoints" / "cat")) [-1] == "1"  # last finished epoch
  resumed_source = ArraySource(f)
  resumed = _train(config, resumed_source, tmp_path / "b")
  assert resumed_source.calls == 2  # only epochs 3 and 4 ran again
  for a, b in zip(_flat(uninterrupted), _flat(resumed)):
    np.testing.assert_array_equal(a, b)
  assert int(resumed["step"]) == int(uninterrupted["step"]) == 4 * 3


def test_more_epochs_continue_from_a_finished_run(tmp_path):
  config = tiny_config(simplenet_config)
  f = features()
  config.train.epochs = 2
  _train(config, ArraySource(f), tmp_path / "w")
  config.train.epochs = 4
  continued = _train(config, ArraySource(f), tmp_path / "w")
  straight = _train(config, ArraySource(f), tmp_path / "fresh")
  for a, b in zip(_flat(continued), _flat(straight)):
    np.testing.assert_array_equal(a, b)


_DATA_PARALLEL_SCRIPT = textwrap.dedent("""
    import os, sys, json
    import jax, numpy as np
    if {processes} > 1:  # several local processes, as on several hosts
      jax.distributed.initialize({address!r}, num_processes={processes}, process_id=int(sys.argv[1]))
    sys.path.insert(0, {tests!r})
    from test_training import ArraySource, tiny_config, features, _train, _flat
    from configs import simplenet as simplenet_config
    from adjax.methods import simplenet
    config = tiny_config(simplenet_config)
    config.train.batch_size = 8
    config.train.epochs = 2
    # 20 images, batch 8: two sharded batches and a last batch of 4 (sharded on 2 and 4
    # devices, replicated on 8).
    state = _train(config, ArraySource(features(n=20)), {workdir!r})
    if jax.process_index() == 0:
      from flax import traverse_util
      flat = traverse_util.flatten_dict(jax.device_get(state["params"]), sep="/")
      method = simplenet.SimpleNet(config)
      scores, maps = method.score(jax.device_get(state), {{"features": features(n=5, seed=9)}}, (4, 4))
      np.savez({out!r}, scores=np.asarray(scores), maps=np.asarray(maps),
               **{{k: np.asarray(v) for k, v in flat.items()}})
    print(json.dumps({{"devices": jax.device_count(), "processes": jax.process_count()}}))
""")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _run_data_parallel(tmp_path, processes, devices_per_process):
  name = f"{processes}x{devices_per_process}"
  script = _DATA_PARALLEL_SCRIPT.format(
      tests=os.path.dirname(__file__), workdir=str(tmp_path / name), out=str(tmp_path / f"{name}.npz"),
      processes=processes, address=f"localhost:{_free_port()}")
  env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices_per_process}", "PYTHONPATH": ROOT}
  running = [subprocess.Popen([sys.executable, "-c", script, str(i)], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(processes)]
  for process in running:
    try:
      out, err = process.communicate(timeout=600)
    finally:
      for other in running:
        if other.poll() is None and process.returncode != 0:
          other.kill()  # a failed process would leave the others waiting for it
    assert process.returncode == 0, err[-3000:]
    reported = json.loads(out.strip().splitlines()[-1])
    assert reported == {"devices": processes * devices_per_process, "processes": processes}
  return np.load(tmp_path / f"{name}.npz")


@pytest.fixture(scope="module")
def one_device_run(tmp_path_factory):
  return _run_data_parallel(tmp_path_factory.mktemp("one_device"), 1, 1)


@pytest.mark.parametrize("processes,devices_per_process", [(1, 8), (2, 2)])
def test_data_parallel_training_matches_one_device(tmp_path, one_device_run, processes, devices_per_process):
  """8 forced CPU devices in one process, and 2 processes x 2 devices through jax.distributed."""
  parallel_run = _run_data_parallel(tmp_path, processes, devices_per_process)
  assert_same_training({k: parallel_run[k] for k in parallel_run.files if "/" in k},
                       {k: one_device_run[k] for k in one_device_run.files if "/" in k})
  # The outputs differ only through BatchNorm's running mean, which trails the drifting biases.
  np.testing.assert_allclose(parallel_run["scores"], one_device_run["scores"], rtol=5e-3)


def test_cached_and_recomputed_features_train_identically(tmp_path, synthetic_root):
  from adjax.data import datasets
  config = tiny_config(simplenet_config)
  config.data.image_size = config.data.crop_size = 64
  config.train.epochs, config.train.batch_size = 2, 3
  records = datasets.read_split("synthetic", synthetic_root, "metal").train[:7]
  method = simplenet.SimpleNet(config)
  extractor = method.make_extractor()
  normalisation = method.normalisation(extractor)
  params = {}
  for cached in (True, False):
    config.train.cache_features = cached
    source = caches.TrainingSet(config, method, extractor, records, ["brushed_steel"], normalisation)
    assert ("features" in source.device) == cached and source.recompute_features != cached
    state = method.init(source.sample(), jax.random.key(0))
    step = train.make_train_step(method, normalisation)
    state = train.train_gradient(config, step, source, state, jax.random.key(1), str(tmp_path / str(cached)), "metal")
    params[cached] = _named(state)
  assert_same_training(params[True], params[False])


def test_padded_short_last_batch_scores_as_if_alone(synthetic_root):
  # score_dataset pads a short last batch with zero images (one compiled shape); the real
  # images' scores and maps must be those of scoring each image on its own.
  from adjax.data import datasets
  config = tiny_config(simplenet_config)
  config.data.image_size = config.data.crop_size = 64
  records = datasets.read_split("synthetic", synthetic_root, "metal").test[:5]
  method = simplenet.SimpleNet(config)
  extractor = method.make_extractor()
  state = method.init({"features": extractor(np.zeros((1, 64, 64, 3), np.float32))}, jax.random.key(0))
  scored = {}
  for batch_size in (3, 1):
    config.eval.batch_size = batch_size
    scored[batch_size] = evaluate.score_dataset(config, method, state, extractor, records, "scoring")
  assert len(scored[3]["scores"]) == len(records)
  # Unscaled Lite0 features (feature_scale 1 before `prepare`): maps up to ~2, rounding ~4e-6.
  np.testing.assert_allclose(scored[3]["scores"], scored[1]["scores"], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(scored[3]["input_maps"], scored[1]["input_maps"], rtol=1e-5, atol=1e-5)
  for padded, alone in zip(scored[3]["maps"], scored[1]["maps"]):  # at the images' own 160x160
    np.testing.assert_allclose(padded, alone, rtol=1e-5, atol=1e-5)


def test_scoring_program_takes_the_backbone_weights_as_arguments():
  # Closed over, the weights become constants inside the compiled program (a 92 MB cache
  # entry for WideResNet50, twice the compile time); passed in, the program text stays small.
  config = tiny_config(simplenet_config)
  method = simplenet.SimpleNet(config)
  extractor = method.make_extractor()
  images = np.zeros((1, 64, 64, 3), np.float32)
  state = method.init({"features": extractor(images)}, jax.random.key(0))
  weight_bytes = sum(a.nbytes for a in jax.tree.leaves(extractor.variables))
  assert weight_bytes > 1e6
  program = evaluate.make_scorer(config, method, extractor).lower(state, extractor.variables, images).as_text()
  assert len(program) < weight_bytes / 10, (len(program), weight_bytes)


def test_training_compiles_ahead_one_step_program_per_batch_size(synthetic_root, tmp_path, monkeypatch, caplog):
  # fit_category compiles init and the step for the full and the short last batch (7 = 3 + 3 + 1)
  # in a background thread while the features are computed. The training loop must then
  # compile no step program of its own (it would if the ahead-of-time programs did not match
  # its calls' shapes, shardings or weak types), and the results must not change.
  import dataclasses
  import logging

  from adjax.data import datasets
  config = tiny_config(simplenet_config)
  config.data.image_size = config.data.crop_size = 64
  config.train.epochs, config.train.batch_size = 2, 3
  split = datasets.read_split("synthetic", synthetic_root, "metal")
  split = dataclasses.replace(split, train=split.train[:7])
  method = simplenet.SimpleNet(config)
  extractor = method.make_extractor()
  sizes = compile_ahead.training_batch_sizes
  assert sizes(7, 3) == [1, 3] and sizes(6, 3) == [3] and sizes(2, 3) == [2]
  futures = []
  precompile = compile_ahead.start
  monkeypatch.setattr(compile_ahead, "start", lambda *a: futures.append(precompile(*a)) or futures[-1])
  caplog.set_level(logging.WARNING)
  jax.config.update("jax_log_compiles", True)  # globally: the context manager is thread-local
  try:
    ahead = train.fit_category(config, method, extractor, split, jax.random.key(0), str(tmp_path / "ahead"))
  finally:
    jax.config.update("jax_log_compiles", False)
  assert len(futures) == 1 and futures[0].result() is True
  step_compiles = [r.threadName for r in caplog.records if "Compiling jit(adjax_train_step)" in r.getMessage()]
  assert len(step_compiles) == 2 and all(t.startswith("adjax-precompile") for t in step_compiles), step_compiles
  late_gathers = [r.threadName for r in caplog.records if "Compiling jit(adjax_gather_batch)" in r.getMessage()
                  and not r.threadName.startswith("adjax-precompile")]
  assert not late_gathers, late_gathers
  monkeypatch.setattr(compile_ahead, "start", lambda *a: None)
  plain = train.fit_category(config, method, extractor, split, jax.random.key(0), str(tmp_path / "plain"))
  assert_same_training(_named(ahead), _named(plain))


def test_bfloat16_feature_cache_yields_rounded_float32_batches(synthetic_root):
  # train.feature_cache_dtype='bfloat16' halves the cache, on the device or (over
  # train.feature_cache_device_mb) on the host; batches stay float32, equal to the float32
  # features rounded to bfloat16. An unknown dtype is refused by name.
  import jax.numpy as jnp

  from adjax import configlib
  from adjax.data import datasets
  from adjax.errors import ConfigError
  config = tiny_config(simplenet_config)
  config.data.image_size = config.data.crop_size = 64
  records = datasets.read_split("synthetic", synthetic_root, "metal").train[:5]
  method = simplenet.SimpleNet(config)
  extractor = method.make_extractor()
  normalisation = method.normalisation(extractor)
  exact = caches.TrainingSet(config, method, extractor, records, ["brushed_steel"], normalisation).all_features()
  order = np.array([4, 1, 3])
  expected = exact[order].astype(jnp.bfloat16).astype(np.float32)
  config.train.feature_cache_dtype = "bfloat16"
  for device_mb, on_device in ((4096, True), (0, False)):
    config.train.feature_cache_device_mb = device_mb
    source = caches.TrainingSet(config, method, extractor, records, ["brushed_steel"], normalisation)
    cached = source.device["features"] if on_device else source.host["features"]
    assert isinstance(cached, jax.Array) == on_device and cached.dtype == jnp.bfloat16
    batch = next(source.epoch(order, 3))["features"]
    assert batch.dtype == np.float32
    np.testing.assert_array_equal(np.asarray(batch), expected)
    assert source.all_features().dtype == np.float32
  assert not np.array_equal(expected, exact[order])  # the rounding is real
  config.train.feature_cache_dtype = "float16"
  with pytest.raises(ConfigError, match="train.feature_cache_dtype"):
    configlib.validate(config)


def test_feature_cache_written_on_the_device_equals_the_host_path(synthetic_root):
  # A cache that fits train.feature_cache_device_mb is written batch by batch into device
  # memory (caches.compute_features(into=...)); it must hold the host path's rows in record
  # order, the short last batch's padding dropped (5 records, batch 2).
  from adjax.data import datasets
  config = tiny_config(simplenet_config)
  config.data.image_size = config.data.crop_size = 64
  config.train.batch_size = 2
  records = datasets.read_split("synthetic", synthetic_root, "metal").train[:5]
  method = simplenet.SimpleNet(config)
  extractor = method.make_extractor()
  normalisation = method.normalisation(extractor)
  config.train.feature_cache_device_mb = 0
  host = caches.TrainingSet(config, method, extractor, records, ["brushed_steel"], normalisation).host["features"]
  config.train.feature_cache_device_mb = 4096
  device = caches.TrainingSet(config, method, extractor, records, ["brushed_steel"], normalisation).device["features"]
  assert isinstance(device, jax.Array) and device.shape == host.shape == (5,) + host.shape[1:]
  np.testing.assert_array_equal(np.asarray(device), host)
  assert len({float(np.abs(r).sum()) for r in host}) == 5  # five different images, so the order is checked


_SHARES_SCRIPT = textwrap.dedent("""
    import json, sys
    import jax, numpy as np
    jax.distributed.initialize({address!r}, num_processes=2, process_id=int(sys.argv[1]))
    from adjax import caches
    from adjax.data import datasets, transforms
    from configs import simplenet as simplenet_config
    from adjax.methods import simplenet
    decoded = []
    load_image = transforms.load_image
    transforms.load_image = lambda path, *a, **k: decoded.append(path) or load_image(path, *a, **k)
    config = simplenet_config.get_config("")
    config.data.image_size = config.data.crop_size = 64
    method = simplenet.SimpleNet(config)
    extractor = method.make_extractor()
    records = datasets.read_split("synthetic", {root!r}, "wood").train[:11]
    features = caches.compute_features(config, extractor, records, "features", *method.normalisation(extractor))
    images = caches.decode_images(config, records, "images")
    if jax.process_index() == 0:
      np.savez({out!r}, features=features, images=images)
    print(json.dumps(sorted(decoded)))
""")


def test_two_processes_each_decode_their_share_and_gather_every_record_in_order(tmp_path, synthetic_root):
  """parallel.record_shard / gather_shards: of 11 training images each of two jax.distributed
  processes decodes its own 6 or 5 (twice: features, then pixels), and both end with every
  record's features and pixels in record order, as one process computes them."""
  out = tmp_path / "gathered.npz"
  script = _SHARES_SCRIPT.format(address=f"localhost:{_free_port()}", root=synthetic_root, out=str(out))
  env = {**os.environ, "PYTHONPATH": ROOT}
  running = [subprocess.Popen([sys.executable, "-c", script, str(i)], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
  decoded = []
  for process in running:
    stdout, stderr = process.communicate(timeout=600)
    assert process.returncode == 0, stderr[-3000:]
    decoded.append(json.loads(stdout.strip().splitlines()[-1]))
  from adjax.data import datasets
  records = datasets.read_split("synthetic", synthetic_root, "wood").train[:11]
  paths = [r.path for r in records]
  for index, seen in enumerate(decoded):  # process i: records i, i + 2, ..., each decoded once per pass
    assert seen == sorted(paths[index::2] * 2)
  config = simplenet_config.get_config("")
  config.data.image_size = config.data.crop_size = 64
  method = simplenet.SimpleNet(config)
  extractor = method.make_extractor()
  gathered = np.load(out)
  one = caches.compute_features(config, extractor, records, "features", *method.normalisation(extractor))
  np.testing.assert_allclose(gathered["features"], one, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(gathered["images"], caches.decode_images(config, records, "images"))
