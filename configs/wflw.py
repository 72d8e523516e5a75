"""WFLW (98 points): the official STAR recipe (4.02 NME reported)."""

from configs import base


def get_config():
  return base.get_base_config("wflw")
