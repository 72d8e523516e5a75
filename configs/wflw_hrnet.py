"""WFLW (98 points): HRNetV2-W18 on the STAR recipe (see configs/hrnet.py)."""

from configs import hrnet


def get_config():
  return hrnet.get_config("wflw")
