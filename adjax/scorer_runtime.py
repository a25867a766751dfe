"""Scores image files with a scorer written by `--mode=export`, with only jax, numpy and pillow.

`--mode=export` copies this file (as scorer.py) and adjax/data/geometry.py beside the exported
program, so that a folder holding scorer.jaxexport, scorer.json, scorer.py and geometry.py is
all a production line needs:

  python scorer.py <export folder> image.png [more images...]     # prints one JSON line per image

or from Python: `Scorer(folder).score(paths)`. Each result has the image's path, its anomaly
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
    results = []
    for start in range(0, len(paths), batch_size):
      images = [geometry.open_upright(p) for p in paths[start:start + batch_size]]
      pixels = np.stack([self.preprocess(image) for image in images])
      scores, maps = (np.asarray(a) for a in self.program.call(pixels))
      for path, image, score, amap in zip(paths[start:start + batch_size], images, scores, maps):
        results.append(self._result(path, image.size, float(score), amap))
    return results

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
  for result in Scorer(argv[1]).score(argv[2:]):
    result.pop("map")
    result.pop("defect_mask", None)
    print(json.dumps(result))


if __name__ == "__main__":
  main(sys.argv)
