"""`python -m star_jax.web --model PATH.onnx|NAME [--port N]`: serves the in-browser demo
(star_jax.deploy.web) until Ctrl-C.
"""

from __future__ import annotations

import argparse
import os
import sys
import urllib.parse
from typing import Sequence

from star_jax.commands import cli
from star_jax.deploy.detection.boxes import Box
from star_jax.errors import DataError, UsageError
from star_jax.deploy.runtime import contract
from star_jax.deploy.web import DEFAULT_PORT, PageServer


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  parser = cli.ArgumentParser(
      prog="python -m star_jax.web",
      description="Serve the in-browser landmark demo (web/, onnxruntime-web) with an exported "
                  "ONNX model on http://127.0.0.1:PORT/. Install the page's runtime first: "
                  "make web.")
  parser.add_argument("--model", required=True,
                      help="a released model (wflw, 300w, cofw: exported once into the cache) or "
                           "an ONNX export (python -m star_jax.export --format onnx); its "
                           "sidecar MODEL.json must lie beside it")
  parser.add_argument("--port", type=int, default=DEFAULT_PORT,
                      help=f"port on 127.0.0.1 (default {DEFAULT_PORT}; 0 picks a free one)")
  parser.add_argument("--image", default=None,
                      help="a photo to open with the page (served as /image.EXT)")
  parser.add_argument("--box", default=None, metavar="X1,Y1,X2,Y2",
                      help="with --image: the face box (image pixels) to run on at once")
  parser.add_argument("--verbose", action="store_true", help="log every request")
  args = parser.parse_args(argv)
  if not 0 <= args.port <= 65535:
    raise UsageError(f"--port {args.port}: must be between 0 and 65535")
  if args.box is not None:
    if args.image is None:
      raise UsageError("--box needs --image (on the page itself, drag the box)")
    args.box = parse_box(args.box)
  if args.image is not None and not os.path.isfile(args.image):
    raise DataError(f"--image {args.image}: no such file")
  return args


def parse_box(text: str) -> tuple[float, float, float, float]:
  """'x1,y1,x2,y2' -> finite floats with x1 < x2 and y1 < y2; UsageError naming --box."""
  try:
    box = Box.parse(text)
  except ValueError as e:
    raise UsageError(f"--box {text}: {e}") from None
  return (box.x1, box.y1, box.x2, box.y2)


def page_url(base: str, image_route: str | None = None,
             box: Sequence[float] | None = None) -> str:
  """The page's address, opening `image_route` (and running on `box`) when given."""
  query = {}
  if image_route:
    query["image"] = image_route
  if box is not None:
    query["box"] = ",".join(f"{v:g}" for v in box)
  return base + ("?" + urllib.parse.urlencode(query, safe="/,") if query else "")


def main(argv: Sequence[str] | None = None) -> int:
  return cli.run(lambda: _main(argv))


def _main(argv: Sequence[str] | None) -> int:
  args = _parse_args(argv)
  routes, image_route = {}, None
  if args.image:
    image_route = "/image" + os.path.splitext(args.image)[1].lower()
    routes[image_route] = args.image
  server = PageServer(args.model, port=args.port, routes=routes, quiet=not args.verbose)
  url = page_url(server.url, image_route, args.box)
  print(f"serving the star-jax page at {url} with {server.model} "
        f"({contract.describe(server.info.record)}); Ctrl-C stops", flush=True)
  try:
    server.httpd.serve_forever()
  except KeyboardInterrupt:
    print("stopped", file=sys.stderr)
  finally:
    server.httpd.server_close()
  return 0
