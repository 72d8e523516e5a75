"""`python -m star_jax.released {list,download,register}`: the released official models
(star_jax.deploy.released).
"""

from __future__ import annotations

from typing import Sequence

from star_jax.commands import cli
from star_jax.deploy.released import ensure, names, register, status


def _main(argv: Sequence[str] | None) -> int:
  parser = cli.ArgumentParser(
      prog="python -m star_jax.released",
      description="The released STAR models (wflw, 300w, cofw) and HRNet face models "
                  "(hrnet-wflw, hrnet-300w, hrnet-cofw, hrnet-aflw): download, register, list.")
  commands = parser.add_subparsers(dest="command", required=True)
  commands.add_parser("list", help="where each released model is (or would be) cached")
  fetch = commands.add_parser("download", help="download (and check) a released model")
  fetch.add_argument("name", choices=names())
  add = commands.add_parser("register", help="check a file downloaded by hand and cache it")
  add.add_argument("name", choices=names())
  add.add_argument("file", help="the downloaded .pkl (STAR) or .pth (HRNet)")
  args = parser.parse_args(argv)
  if args.command == "list":
    for name in names():
      print(status(name))
  elif args.command == "download":
    print(ensure(args.name))
  else:
    print(f"registered {register(args.name, args.file)}")
  return 0


def main(argv: Sequence[str] | None = None) -> int:
  return cli.run(lambda: _main(argv))
