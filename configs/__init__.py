"""Experiment configurations: `configs/<name>.py` files with `get_config()`."""
