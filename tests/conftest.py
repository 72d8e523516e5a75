"""Suite-wide ordering: the test files with slow tests are collected first, so that under
`pytest -n 2 --dist loadfile` (what `make test` runs) the longest files start at once and the
short ones fill the other worker, instead of a long file starting last and running alone."""

from __future__ import annotations


def pytest_collection_modifyitems(config, items):
  del config
  slow_files = {item.path for item in items if item.get_closest_marker("slow")}
  # Stable: within each group the files keep their usual order.
  items.sort(key=lambda item: item.path not in slow_files)


def pytest_configure(config):
  """The library's warnings and notices as the commands show them (plain lines on the current
  stderr), so a test reads what a user sees whichever handlers other libraries installed."""
  del config
  from star_jax.commands import cli
  cli.show_library_messages()
