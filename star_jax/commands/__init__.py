"""The process side of every command: argument parsing (one style, argparse), the
error contract (one line, exit 2 usage / 1 data) and process settings. Library
modules parse no arguments and leave the process alone.
"""
