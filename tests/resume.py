"""Kill-and-resume for the tests: one training run straight through, one killed at the start of an
epoch and restarted in the same workdir, as a user's Ctrl-C and rerun would."""

import pytest

from adjax import caches, train


def straight_and_resumed(config, tmp_path, monkeypatch, kill_in_epoch=3, after_kill=None):
  """(straight workdir, resumed workdir) of `config`: the second run is interrupted
  (KeyboardInterrupt) when training epoch `kill_in_epoch` (1-based) asks for its batches, then rerun;
  `after_kill(resumed workdir)` runs between the two."""
  straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
  train.run(config, straight, "train")
  full_epoch, calls = caches.TrainingSet.epoch, []

  def dying_epoch(self, order, batch_size):
    calls.append(len(order))
    if len(calls) == kill_in_epoch:
      raise KeyboardInterrupt(f"simulated kill in epoch {kill_in_epoch}")
    return full_epoch(self, order, batch_size)

  monkeypatch.setattr(caches.TrainingSet, "epoch", dying_epoch)
  with pytest.raises(KeyboardInterrupt):
    train.run(config, resumed, "train")
  if after_kill is not None:
    after_kill(resumed)
  monkeypatch.setattr(caches.TrainingSet, "epoch", full_epoch)
  train.run(config, resumed, "train")
  return straight, resumed
