"""One progress bar with ETA for every long loop (tqdm on stderr)."""

import sys

from tqdm.auto import tqdm


def bar(total, desc, unit="img"):
  return tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True, file=sys.stderr,
              mininterval=0.5 if sys.stderr.isatty() else 5.0, leave=False)
