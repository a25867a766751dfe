"""One progress bar with ETA for every long loop (tqdm on stderr)."""

import sys

from tqdm.auto import tqdm


def bar(total, desc, unit="img"):
  """Redrawn at most twice a second on a terminal, every 30 s into a file or pipe (a log)."""
  return tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True, file=sys.stderr,
              mininterval=0.5 if sys.stderr.isatty() else 30.0, leave=False)
