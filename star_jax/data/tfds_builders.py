"""TensorFlow Datasets builders for WFLW, 300W and COFW (manual download), and their reader.

Builders (registered when this module is imported):

  dataset   TFDS name    class       splits
  WFLW      star_wflw    StarWflw    train, test
  300W      star_300w    Star300w    train, test (full), test_common, test_challenge
  COFW      star_cofw    StarCofw    train, test

Each has two configs: `jpeg` (default; stored crops re-encoded as JPEG quality 95) and `png`
(lossless: the stored pixels are exactly the decoded original's). Names carry a `star_` prefix
so they never clash with a TFDS catalogue dataset.

Manual download. Put the images and the official-format TSVs (as written by
`star_jax.foreign.original_formats`, or the ADNet metadata) in one folder, the manual dir:

  <manual_dir>/train.tsv
  <manual_dir>/test.tsv
  <manual_dir>/val.tsv           optional: a `val` split (otherwise training carves one from
                                 `train` by the rule of star_jax.data.sources)
  <manual_dir>/images/...        TSV image paths are relative to this folder (if it exists;
                                 otherwise to <manual_dir> itself)

(the embedded dataset's folder has exactly this layout). Build with

  python -m star_jax.data.tfds_builders wflw --manual_dir DIR [--data_dir DIR] [--config png]

or `tfds.builder("star_wflw", data_dir=...).download_and_prepare(download_config=
tfds.download.DownloadConfig(manual_dir=DIR))`. The 300W test subsets follow the path rule of
`star_jax.core.schemes.W300.path_subsets` (common: 'lfpw' or 'helen' in the path, challenge:
'ibug'),
matched on the paths as the TSV writes them, below the image folder.

What one example stores. Decoding whole photos (WFLW: about 1000x800 JPEGs, the face a third of
the width) dominates an input pipeline, so each example keeps only the face region: the part of
the image that any crop the training can draw reads, cut out around the (scale, center) box.
Features: `image` (the stored crop), `landmarks` (N, 2) float32 and `center` (2,) float64 in the
crop frame, `offset` (2,) float64 (x, y of the crop's top-left pixel in the original image),
`scale` float64, `tags` (6,) int32, `index` int64 (row in the TSV), `image_path` (the image path
as the TSV writes it) and `image_size` (2,) int32 (original height, width).

The margin. The training warp is `G @ C`: C maps the `L = scale * 200` pixel face box onto the
S x S crop, G rotates by theta and scales by s about the crop centre and shifts by t pixels. A
crop pixel p comes from the source point `C^-1 G^-1 p`; its distance from the box centre along x
or y is at most `L / S * (S/2 * (|cos theta| + |sin theta|) + |t|) / s`. Taking every draw up to
`MARGIN_SIGMAS` = 3 standard deviations of the official parameters (rotation 18 deg -> 54 deg,
so |cos| + |sin| reaches sqrt(2); scale 0.1 -> s >= 0.7; shift 0.05 * (S-1) per axis -> |t| <=
sqrt(2) * 0.15 * S) bounds it by

  half_width = L * (sqrt(2)/2 + sqrt(2) * 0.15) / 0.7 = 1.3132 * L   (+ 2 pixels for bilinear)

for any crop size S. The stored crop is the square centre +- half_width, intersected with the
image: pixels outside the image are not stored, since the warp's constant-0 border supplies the
same zeros that padding would hold (bilinear reads at the image edge blend with 0 either way),
and mirroring the stored crop about its own width is the official mirror of the whole image
(crop-frame centre and landmarks mirror with it). Draws beyond 3 sigma (about 1 % of samples
for all three parameters together) may read black where the photo would have continued.

Reader: `load_records(config, split)` -> `tf.data.Dataset` of sample dicts (`image` uint8 RGB,
`landmarks` (N, 2) float32 in the crop frame, `scale` float64, `center` (2,) float64 in the
crop frame, `tags` (6,) int32, `index` int64, `offset` (2,) float64).
"""

from __future__ import annotations

if __name__ == "__main__":
  # `python -m` would define (and register) the builders in a module named __main__, where TFDS
  # cannot locate their resources: run the module imported under its real name instead.
  # The command (its arguments) is star_jax.commands.tfds_builders.
  from star_jax.commands import tfds_builders as _command
  raise SystemExit(_command.main())

import math
import os
from typing import Mapping, Sequence

import cv2
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from star_jax.data.annotations import read_tsv
from star_jax.data.images import read_image
from star_jax.data.transforms import OFFICIAL_AUGMENT
from star_jax.core import metrics
from star_jax.core.schemes import DatasetSpec, get_spec
from star_jax.errors import DataError, UsageError

MARGIN_SIGMAS = 3.0
BILINEAR_PAD = 2
JPEG_QUALITY = 95


def margin_factor(rotation_sigma_deg: float = OFFICIAL_AUGMENT["rotation_sigma_deg"],
                  scale_sigma: float = OFFICIAL_AUGMENT["scale_sigma"],
                  shift_sigma: float = OFFICIAL_AUGMENT["shift_sigma"],
                  n_sigma: float = MARGIN_SIGMAS) -> float:
  """Half-width of the stored crop in face boxes (`scale * 200` pixels); see the docstring."""
  theta = math.radians(n_sigma * rotation_sigma_deg)
  spread = math.sqrt(2.0) if theta >= math.pi / 4 else math.cos(theta) + math.sin(theta)
  min_scale = 1.0 - n_sigma * scale_sigma
  if min_scale <= 0:
    raise ValueError(f"scale sigma {scale_sigma} x {n_sigma} reaches zero zoom: no finite margin")
  return (spread / 2.0 + math.sqrt(2.0) * n_sigma * shift_sigma) / min_scale


def crop_window(scale: float, center: Sequence[float], image_hw: Sequence[int],
                factor: float | None = None) -> tuple[int, int, int, int]:
  """The stored region `(x0, y0, x1, y1)` (pixels, end exclusive) of an image of `image_hw`."""
  factor = margin_factor() if factor is None else factor
  half = factor * float(scale) * 200.0 + BILINEAR_PAD
  h, w = int(image_hw[0]), int(image_hw[1])
  x0 = min(max(int(math.floor(center[0] - half)), 0), w - 1)
  y0 = min(max(int(math.floor(center[1] - half)), 0), h - 1)
  x1 = max(min(int(math.ceil(center[0] + half)) + 1, w), x0 + 1)
  y1 = max(min(int(math.ceil(center[1] + half)) + 1, h), y0 + 1)
  return x0, y0, x1, y1


def _encode(image_rgb: np.ndarray, encoding: str) -> bytes:
  bgr = np.ascontiguousarray(image_rgb[..., ::-1])
  if encoding == "jpeg":
    ok, data = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
  else:
    ok, data = cv2.imencode(".png", bgr, [cv2.IMWRITE_PNG_COMPRESSION, 3])
  if not ok:
    raise RuntimeError(f"{encoding} encoding failed")
  return data.tobytes()


class StarBuilderConfig(tfds.core.BuilderConfig):
  """How stored crops are encoded: 'jpeg' (quality 95) or 'png' (lossless)."""

  def __init__(self, *, encoding: str, **kwargs):
    super().__init__(**kwargs)
    self.encoding = encoding


_CONFIGS = [
    StarBuilderConfig(name="jpeg", encoding="jpeg",
                      description="face crops re-encoded as JPEG quality 95"),
    StarBuilderConfig(name="png", encoding="png",
                      description="face crops stored losslessly as PNG"),
]


class _StarBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Shared body: one example per TSV row, a margin-padded face crop plus its annotation."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Face crops covering +-3 sigma of the official augmentation."}
  BUILDER_CONFIGS = _CONFIGS
  DEFAULT_CONFIG_NAME = "jpeg"
  DATASET = ""          # key of star_jax.core.schemes.SPECS
  HOMEPAGE = ""
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Place train.tsv and test.tsv (official STAR/ADNet TSV format; see
  `python -m star_jax.data.original_formats`) in the manual dir, with the images under
  <manual_dir>/images/ (TSV paths relative to it) or directly under <manual_dir>.
  """

  @property
  def spec(self) -> DatasetSpec:
    return get_spec(self.DATASET)

  def _info(self) -> tfds.core.DatasetInfo:
    n = self.spec.num_points
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3),
                                         encoding_format=self.builder_config.encoding),
            "landmarks": tfds.features.Tensor(shape=(n, 2), dtype=np.float32),
            "center": tfds.features.Tensor(shape=(2,), dtype=np.float64),
            "offset": tfds.features.Tensor(shape=(2,), dtype=np.float64),
            "scale": tfds.features.Scalar(dtype=np.float64),
            "tags": tfds.features.Tensor(shape=(6,), dtype=np.int32),
            "index": tfds.features.Scalar(dtype=np.int64),
            "image_path": tfds.features.Text(),
            "image_size": tfds.features.Tensor(shape=(2,), dtype=np.int32),
        }),
        homepage=self.HOMEPAGE,
    )

  def _test_subsets(self) -> Mapping[str, tuple[str, ...]]:
    return {name: keys for name, keys in self.spec.path_subsets if name != "full"}

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    manual = os.fspath(dl_manager.manual_dir)
    for required in ("train.tsv", "test.tsv"):
      if not os.path.exists(os.path.join(manual, required)):
        raise DataError(f"{os.path.join(manual, required)} is missing; the manual dir needs "
                        "train.tsv and test.tsv (val.tsv optional) and the images under "
                        "images/ (README, 'TFDS')")
    splits = {"train": self._generate_examples(manual, "train.tsv", None),
              "test": self._generate_examples(manual, "test.tsv", None)}
    if os.path.exists(os.path.join(manual, "val.tsv")):
      splits["val"] = self._generate_examples(manual, "val.tsv", None)
    for name, keys in self._test_subsets().items():
      splits[f"test_{name}"] = self._generate_examples(manual, "test.tsv", keys)
    return splits

  def _generate_examples(self, manual_dir: str, tsv_name: str, path_keys):
    tsv = os.path.join(manual_dir, tsv_name)
    image_dir = manual_image_dir(manual_dir)
    ann = read_tsv(tsv, self.spec, image_dir=image_dir, check_images=True)
    factor = margin_factor()
    encoding = self.builder_config.encoding
    for row in range(len(ann)):
      path = ann.image_paths[row]
      # Subsets by the path as the TSV writes it, below the image folder: the folder's own
      # location (e.g. '.../ibug_300W_large_face_landmark_dataset/') must not decide them.
      key = metrics.subset_key(ann.raw_paths[row], image_dir)
      if path_keys is not None and not any(k in key for k in path_keys):
        continue
      image = read_image(path)
      h, w = image.shape[:2]
      center = ann.center[row].astype(np.float64)
      x0, y0, x1, y1 = crop_window(float(ann.scale[row]), center, (h, w), factor)
      offset = np.array([x0, y0], np.float64)
      yield row, {
          "image": _encode(image[y0:y1, x0:x1], encoding),
          "landmarks": (ann.landmarks[row] - offset.astype(np.float32)).astype(np.float32),
          "center": center - offset,
          "offset": offset,
          "scale": float(ann.scale[row]),
          "tags": ann.tags[row].astype(np.int32),
          "index": row,
          "image_path": ann.raw_paths[row],
          "image_size": np.array([h, w], np.int32),
      }


def manual_image_dir(manual_dir: str) -> str:
  """Where a manual dir's TSV image paths are relative to: `images/` if it exists, else itself."""
  image_dir = os.path.join(manual_dir, "images")
  return image_dir if os.path.isdir(image_dir) else manual_dir


class StarWflw(_StarBuilder):
  """WFLW, 98 landmarks and 6 attribute tags (Wu et al. 2018)."""

  name = "star_wflw"
  DATASET = "wflw"
  HOMEPAGE = "https://wywu.github.io/projects/LAB/WFLW.html"


class Star300w(_StarBuilder):
  """300W, 68 landmarks; test subsets common (LFPW + HELEN) and challenge (iBUG)."""

  name = "star_300w"
  DATASET = "300w"
  HOMEPAGE = "https://ibug.doc.ic.ac.uk/resources/300-W/"


class StarCofw(_StarBuilder):
  """COFW, 29 landmarks (Burgos-Artizzu et al. 2013)."""

  name = "star_cofw"
  DATASET = "cofw"
  HOMEPAGE = "https://data.caltech.edu/records/bc0bf-nc666"


BUILDERS = {"wflw": StarWflw, "300w": Star300w, "cofw": StarCofw}

def builder_for(dataset: str, *, data_dir: str | None = None,
                config: str | None = None) -> tfds.core.DatasetBuilder:
  """The builder of `dataset` ('wflw', '300w', 'cofw') over `data_dir` ('' / None: TFDS's
  default, which is $TFDS_DATA_DIR when set, else ~/tensorflow_datasets)."""
  spec = get_spec(dataset)
  if spec.name not in BUILDERS:
    raise UsageError(f"no TFDS builder for dataset {dataset!r}; TFDS sources exist for "
                     f"{', '.join(sorted(BUILDERS))} (other schemes: use TSV files)")
  kwargs = {"data_dir": data_dir or None}
  if config:
    kwargs["config"] = config
  return BUILDERS[spec.name](**kwargs)


def prepared_builder(config, builder_config: str | None = None) -> tfds.core.DatasetBuilder:
  """The prepared builder of `config.dataset` in `config.data.tfds_data_dir` ('jpeg' first)."""
  data_dir = config.data.get("tfds_data_dir", "") or None
  names = [builder_config] if builder_config else [c.name for c in _CONFIGS]
  for name in names:
    builder = builder_for(config.dataset, data_dir=data_dir, config=name)
    if tf.io.gfile.exists(os.path.join(builder.data_dir, "dataset_info.json")):
      return builder
  raise DataError(
      f"TFDS dataset {builder.name} is not prepared in {os.path.dirname(builder.data_dir)}; "
      f"build it with `python -m star_jax.data.tfds_builders {get_spec(config.dataset).name} "
      f"--manual_dir DIR{' --data_dir ' + data_dir if data_dir else ''}`")


def load_records(builder: tfds.core.DatasetBuilder, split: str, *,
                 decode_image: bool = True) -> tf.data.Dataset:
  """Source records (star_jax.data.sources) of `split`: `pixels` (the stored crop; encoded bytes
  with `decode_image=False`), `landmarks`, `scale`, `center` in the crop frame, `offset`,
  `tags`, `index` and `path` (the image path as its TSV wrote it)."""
  decoders = None if decode_image else {"image": tfds.decode.SkipDecoding()}
  ds = builder.as_dataset(split=split, shuffle_files=False, decoders=decoders)

  def to_record(example):
    return {"pixels": example["image"], "landmarks": example["landmarks"],
            "scale": example["scale"], "center": example["center"],
            "offset": example["offset"], "tags": example["tags"], "index": example["index"],
            "path": example["image_path"]}

  return ds.map(to_record, num_parallel_calls=tf.data.AUTOTUNE)
