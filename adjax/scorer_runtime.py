"""Scores image files with a scorer written by `--mode=export`, with only jax, numpy and pillow.

`--mode=export` copies this file (as scorer.py) and adjax/data/geometry.py beside the exported
program, so that a folder holding scorer.jaxexport, scorer.json, scorer.py and geometry.py is
all a production line needs:

  python scorer.py <export folder> image.png [more images...]     # prints one JSON line per image

An image that cannot be read gets a line with its error instead, the others are still scored,
and the exit status is then 1. From Python: `Scorer(folder).score(paths)` (or `.results(paths)`,
batch by batch). Each result has the image's path, its anomaly
score, the normalised score (0 at the model's held-out normal images' median, 1 at the
threshold; None when the threshold is not above that median), `anomalous` at the stored
threshold, `defect_mask` (the map's pixels above the stored pixel threshold; printed as its
`defect_fraction`), and the anomaly map at the image's own resolution in the whole-image modes
(data.resize squash or pad).
"""

import json
import os
import sys

import numpy as np
from jax import export
from PIL import Image

try:  # inside an installed adjax; in an export folder, the copy beside this file
  from adjax.data import geometry
except ImportError:
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  import geometry


class Scorer:
  def __init__(self, folder: str):
    self.meta = json.load(open(os.path.join(folder, "scorer.json")))
    with open(os.path.join(folder, "scorer.jaxexport"), "rb") as f:
      self.program = export.deserialize(bytearray(f.read()))

  def preprocess(self, image: Image.Image) -> np.ndarray:
    m = self.meta
    return geometry.preprocess_image(geometry.to_rgb(image), m["image_size"], m["crop_size"], None, None,
                                     m["resize"])

  def score(self, paths, batch_size: int = 8) -> list:
    """One result per path, in order; a file that cannot be read as an image raises."""
    return list(self.results(paths, batch_size))

  def results(self, paths, batch_size: int = 8, unreadable: str = "raise"):
    """score()'s results as each batch is done; with unreadable='report', a file that cannot be read
    as an image gives {'image': path, 'error': why} in its place and the others are still scored."""
    for start in range(0, len(paths), batch_size):
      batch = paths[start:start + batch_size]
      images = [self._open(p, unreadable) for p in batch]  # an image, or why it cannot be read
      results = [{"image": p, "error": image} if isinstance(image, str) else None for p, image in zip(batch, images)]
      read = [i for i, result in enumerate(results) if result is None]
      if read:
        pixels = np.stack([self.preprocess(images[i]) for i in read])
        scores, maps = (np.asarray(a) for a in self.program.call(pixels))
        for i, score, amap in zip(read, scores, maps):
          results[i] = self._result(batch[i], images[i].size, float(score), amap)
      yield from results

  @staticmethod
  def _open(path, unreadable):
    try:
      return geometry.open_upright(path)
    except (OSError, ValueError, SyntaxError) as e:  # Pillow's errors for missing, broken or unknown files
      if unreadable == "raise":
        raise
      return f"cannot be read as an image: {e}"

  def _result(self, path, size, score, amap) -> dict:
    m = self.meta
    if m["resize"] in geometry.WHOLE_IMAGE:
      amap = geometry.to_original(amap, size[0], size[1], m["resize"])
    result = {"image": path, "score": score, "map": amap}
    decision = m.get("decision")
    if decision:
      # evaluate.normalised_scores: no scale, so None, when the threshold is not above the median.
      spread = decision["threshold"] - decision["normal_median"]
      result["normalised_score"] = (score - decision["normal_median"]) / spread if spread > 0 else None
      result["anomalous"] = score > decision["threshold"]
      if "pixel_threshold" in decision:  # evaluate.defect_pixels
        result["defect_mask"] = amap > decision["pixel_threshold"]
        result["defect_fraction"] = float(result["defect_mask"].mean())
    return result


def main(argv):
  if len(argv) < 3:
    sys.exit("usage: python scorer.py <export folder> <image> [<image> ...]")
  failed = 0
  for result in Scorer(argv[1]).results(argv[2:], unreadable="report"):
    result.pop("map", None)
    result.pop("defect_mask", None)
    failed += "error" in result
    print(json.dumps(result), flush=True)  # each line as soon as its batch is scored
  if failed:
    sys.exit(f"{failed} of {len(argv) - 2} images could not be read; their lines say why.")


if __name__ == "__main__":
  main(sys.argv)
