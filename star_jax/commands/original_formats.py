"""`python -m star_jax.data.original_formats DATASET --source DIR --out DIR`: the original
annotation files -> star-jax TSVs (star_jax.foreign.original_formats), checked before any write.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from typing import Callable, Sequence

from star_jax.commands import cli
from star_jax.errors import DataError, UsageError
from star_jax.foreign.original_formats import (COFW_MAT, CROP_RULES, IMAGES_LINK, Record, SPLITS,
                                               WFLW_IMAGE_FOLDER, WFLW_LIST, _300w_tsvs,
                                               _write_text, check_images_link, find_wflw_images,
                                               link_images, locate_split_files, missing_images,
                                               read_300w, read_cofw_mat, read_wflw_list, tsv_text,
                                               write_cofw_split)


@dataclasses.dataclass
class _Plan:
  """Everything a conversion will write, fully read and checked before the first write."""

  tsvs: dict[str, tuple[int, str]]                 # file name -> (faces, TSV text)
  image_dir: str | None = None                     # folder to link as OUT/images
  write_images: Callable[[str], None] | None = None  # COFW: writes OUT/images itself
  found: list[str] = dataclasses.field(default_factory=list)   # what was read, for the report
  notes: list[str] = dataclasses.field(default_factory=list)


def _plan_wflw(args) -> _Plan:
  files = locate_split_files(args.source, WFLW_LIST, "WFLW annotation")
  records = {split: read_wflw_list(path) for split, path in files.items()}
  plan = _Plan(tsvs={f"{split}.tsv": (len(r), tsv_text(r, "wflw", crop_rule=args.crop_rule,
                                                         box=args.box))
                     for split, r in records.items()})
  plan.found = [f"{split}: {path} ({len(records[split])} faces)" for split, path in files.items()]
  paths = [r.image_path for split in SPLITS for r in records[split]]
  if args.images:
    if not os.path.isdir(args.images):
      raise DataError(f"--images {args.images}: no such folder")
    missing = missing_images(args.images, paths)
    if missing:
      raise DataError(f"--images {args.images}: {len(missing)} of {len(paths)} images the "
                      f"annotations name are not there (first: {missing[0]})")
    plan.image_dir = args.images
    plan.found.append(f"images: {args.images} (all {len(paths)} present)")
    return plan
  guess = find_wflw_images(files["train"])
  if guess is None:
    plan.notes.append(f"no {WFLW_IMAGE_FOLDER} folder beside the annotations and no --images: "
                      f"OUT/images not created (TSV paths are relative to {WFLW_IMAGE_FOLDER})")
    return plan
  missing = missing_images(guess, paths)
  if missing:
    plan.notes.append(f"{guess} lacks {len(missing)} of {len(paths)} images (first: "
                      f"{missing[0]}): not linked; give the image folder with --images")
    return plan
  plan.image_dir = guess
  plan.found.append(f"images: {guess} (beside the annotations; all {len(paths)} present)")
  return plan


def _plan_300w(args) -> _Plan:
  if not os.path.exists(args.source):
    raise DataError(f"{args.source}: no such folder")
  if not os.path.isdir(args.source):
    raise UsageError(f"{args.source}: 300w takes the 300W folder (afw/, helen/, ibug/, lfpw/), "
                     "not a file")
  by_group = read_300w(args.source, one_based=args.keep_one_based)
  plan = _Plan(tsvs=_300w_tsvs(by_group, args.crop_rule), image_dir=args.source)
  for name, folders in by_group.items():
    parts = ", ".join(f"{sub} {len(r)}" for sub, r in folders.items())
    plan.found.append(f"{name}: {parts} faces")
  plan.found.append(f"images: {args.source} (beside their .pts files)")
  return plan


def _plan_cofw(args) -> _Plan:
  files = locate_split_files(args.source, COFW_MAT, "COFW")
  data = {split: read_cofw_mat(path, split, one_based=args.keep_one_based)
          for split, path in files.items()}
  tsvs = {}
  for split, (_, landmarks, _) in data.items():
    records = [Record(image_path=f"{split}/{k:05d}.png", landmarks=lm)
               for k, lm in enumerate(landmarks)]
    tsvs[f"{split}.tsv"] = (len(records), tsv_text(records, "cofw", crop_rule=args.crop_rule))

  def write_images(out_dir: str) -> None:
    for split, (images, landmarks, occlusion) in data.items():
      write_cofw_split(out_dir, split, images, landmarks, occlusion, crop_rule=args.crop_rule)

  plan = _Plan(tsvs=tsvs, write_images=write_images)
  plan.found = [f"{split}: {path} ({len(data[split][0])} faces)" for split, path in files.items()]
  return plan


_PLANNERS = {"wflw": _plan_wflw, "300w": _plan_300w, "cofw": _plan_cofw}


def _parser() -> argparse.ArgumentParser:
  parser = cli.ArgumentParser(
      prog="python -m star_jax.data.original_formats",
      description="Converts original WFLW / 300W / COFW annotations to official TSV files in a "
                  "folder that is also a TFDS manual dir (train.tsv, test.tsv, images/).")
  sub = parser.add_subparsers(dest="dataset", required=True)
  sources = {
      "wflw": f"{WFLW_LIST.format(split='train')} (or _test), or a folder holding both",
      "300w": "the 300W folder (afw/, helen/, ibug/, lfpw/)",
      "cofw": f"{COFW_MAT.format(split='train')} (or _test), or a folder holding both",
  }
  for name, help_text in sources.items():
    p = sub.add_parser(name, help=f"SOURCE: {help_text}")
    p.add_argument("source", help=help_text)
    p.add_argument("--out", required=True,
                   help="output folder: train.tsv, test.tsv, images/ (a TFDS manual dir)")
    p.add_argument("--crop-rule", default="max", choices=CROP_RULES)
    if name == "wflw":
      p.add_argument("--box", default="landmarks", choices=("landmarks", "rect"),
                     help="crop box: the landmarks' box (ADNet) or the detector rectangle")
      p.add_argument("--images", default=None, metavar="DIR",
                     help=f"the {WFLW_IMAGE_FOLDER} folder, linked as OUT/images (default: "
                          f"a {WFLW_IMAGE_FOLDER} folder found beside the annotations)")
    else:
      p.add_argument("--keep-one-based", action="store_true",
                     help="keep MATLAB 1-based coordinates (default: subtract 1)")
  return parser


def _convert(argv: Sequence[str] | None) -> int:
  args = _parser().parse_args(argv)
  plan = _PLANNERS[args.dataset](args)
  out = args.out
  check_images_link(out, plan.image_dir)
  print(f"{args.dataset}: found")
  for line in plan.found:
    print(f"  {line}")
  os.makedirs(out, exist_ok=True)
  if plan.image_dir is not None:
    link_images(out, plan.image_dir)
  if plan.write_images is not None:
    plan.write_images(out)
  else:
    for name, (_, text) in plan.tsvs.items():
      _write_text(os.path.join(out, name), text)
  written = ", ".join(f"{name} ({count} faces)" for name, (count, _) in plan.tsvs.items())
  print(f"wrote to {out}: {written}")
  if args.dataset == "cofw":
    print("  images/train, images/test (PNG), train_occlusion.tsv, test_occlusion.tsv")
  for note in plan.notes:
    print(f"note: {note}")
  images = os.path.join(out, IMAGES_LINK)
  if plan.image_dir is not None or plan.write_images is not None:
    print(f"{out} is a TSV dataset folder and a TFDS manual dir:\n"
          f"  TSV:  --config.data.image_dir={images} "
          f"--config.data.train_tsv={os.path.join(out, 'train.tsv')} "
          f"--config.data.test_tsv={os.path.join(out, 'test.tsv')}\n"
          f"  TFDS: python -m star_jax.data.tfds_builders {args.dataset} --manual-dir {out}")
  else:
    print(f"{out} holds the TSVs: train with --config.data.image_dir=<your "
          f"{WFLW_IMAGE_FOLDER}>; rerun with --images to make it a TFDS manual dir too")
  return 0


def main(argv: Sequence[str] | None = None) -> int:
  """The converter CLI under the error contract: a user mistake is one line, exit 2 or 1."""
  return cli.run(lambda: _convert(argv))
