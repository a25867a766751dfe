"""User-facing errors.

Anything that is the user's to fix (a path, a file, a config key) raises
`AdjaxError` with a message that names the thing and says what to do. The CLI
prints the message as one paragraph and exits non-zero without a traceback.
"""


class AdjaxError(Exception):
  """An error caused by input the user can fix; the message says how."""


class DataError(AdjaxError):
  """A dataset file or folder is missing, unreadable or inconsistent."""


class ConfigError(AdjaxError):
  """A config key is unknown, mistyped or has an invalid value."""


class WeightsError(AdjaxError):
  """Backbone weights are missing, corrupt or do not match the architecture."""


class CheckpointError(AdjaxError):
  """A checkpoint or workdir cannot be used."""


class Interrupted(KeyboardInterrupt):
  """Ctrl-C during training, with where it happened; the CLI turns it into one line."""

  def __init__(self, category: str, epoch: int, saved_epoch):
    super().__init__(f"interrupted in epoch {epoch + 1} of {category}")
    self.category, self.epoch, self.saved_epoch = category, epoch, saved_epoch
