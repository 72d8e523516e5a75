"""COFW (29 points): the official STAR recipe."""

from configs import base


def get_config():
  return base.get_base_config("cofw")
