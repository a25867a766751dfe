"""train.categories_together (adjax/together.py): the built-in dataset's three categories, made
uneven (70, 81 and 77 training images: 9, 11 and 10 steps an epoch, short last batches of 6, 1
and 5), trained in one program give each category its solo run's parameters and metrics; an
interrupted run resumes to the same; 8 forced devices give what one does."""

import dataclasses
import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
import toy_methods

from adjax import checkpoints, together, train
from configs import simplenet

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEEP = {"cloth": 70, "metal": 77}  # training images kept; wood keeps its 81
CATEGORIES = ("cloth", "wood", "metal")
toy_methods.register()


def _config(root, name="toy_feature_head", categories_together=True, epochs=2):
  config = simplenet.get_config("")  # its Lite0 patch features, cached
  config.model.name = name
  config.data.root = root
  config.data.image_size = config.data.crop_size = 64
  config.eval.num_overlays = 0
  config.train.epochs, config.train.checkpoint_every, config.train.checkpoint_min_seconds = epochs, 1, 0.0
  config.train.categories_together = categories_together
  return config


def _uneven(monkeypatch):
  load = train.load_splits
  monkeypatch.setattr(train, "load_splits", lambda config, method: [
      dataclasses.replace(s, train=s.train[:KEEP.get(s.category, len(s.train))]) for s in load(config, method)])


def _states(workdir):
  return {c: jax.tree.map(np.asarray, checkpoints.restore(str(workdir), c)["state"]) for c in CATEGORIES}


def _assert_same(a, b, rtol=1e-5, atol=1e-6):
  for category in CATEGORIES:
    for name in a[category]:
      np.testing.assert_allclose(a[category][name], b[category][name], rtol=rtol, atol=atol,
                                 err_msg=f"{category} {name}")


def test_together_equals_one_after_another_and_resumes(tmp_path, synthetic_root, monkeypatch):
  _uneven(monkeypatch)
  solo = train.run(_config(synthetic_root, categories_together=False), str(tmp_path / "solo"), "train")
  assert not os.path.exists(tmp_path / "solo" / "checkpoints" / "together_cloth+wood+metal")

  # Interrupted at global step 15 of 22 (rounds of 11 steps: checkpoints after steps 10 and 21).
  make_step, sizes = together.make_step, []

  def interrupting(step_fn, mesh, batch_size):
    program = make_step(step_fn, mesh, batch_size)
    sizes.append(batch_size)

    def run(*args):
      if args[-1] == 15:
        raise KeyboardInterrupt
      return program(*args)
    return run
  monkeypatch.setattr(together, "make_step", interrupting)
  with pytest.raises(KeyboardInterrupt):
    train.run(_config(synthetic_root), str(tmp_path / "together"), "train")
  assert sorted(sizes) == [1, 5, 6, 8]  # one program for full batches, one per short size
  assert not any(checkpoints.exists(str(tmp_path / "together"), c) for c in CATEGORIES)
  monkeypatch.setattr(together, "make_step", make_step)
  resumed = train.run(_config(synthetic_root), str(tmp_path / "together"), "train")

  states = _states(tmp_path / "together")
  assert sorted(int(s["step"]) for s in states.values()) == [18, 20, 22]  # each category's own 2 epochs
  _assert_same(states, _states(tmp_path / "solo"))
  for category in CATEGORIES:
    for key in ("image_auroc", "pixel_auroc", "aupro"):
      assert resumed[category][key] == pytest.approx(solo[category][key], abs=1e-6), (category, key)


_DEVICES_SCRIPT = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, {tests!r})
    import jax
    import test_together
    from adjax import train
    config = test_together._config({root!r})
    report = train.run(config, {workdir!r}, "train")
    auroc = [report[c]["image_auroc"] for c in test_together.CATEGORIES]
    print(json.dumps({{"devices": jax.device_count(), "auroc": auroc}}))
""")


@pytest.mark.slow
def test_together_on_8_devices_matches_one(tmp_path, synthetic_root):
  """The members' batches sharded over 8 forced CPU devices: the same parameters as on one."""
  out = {}
  for devices in (1, 8):
    workdir = tmp_path / f"devices{devices}"
    script = _DEVICES_SCRIPT.format(tests=os.path.dirname(__file__), root=synthetic_root, workdir=str(workdir))
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", "PYTHONPATH": ROOT}
    done = subprocess.run([sys.executable, "-c", script], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    reported = json.loads(done.stdout.strip().splitlines()[-1])
    assert reported["devices"] == devices
    assert "training cloth, wood, metal together" in done.stderr  # its progress bar
    out[devices] = (_states(workdir), reported["auroc"])
  _assert_same(out[8][0], out[1][0])
  assert out[8][1] == pytest.approx(out[1][1], abs=1e-6)
