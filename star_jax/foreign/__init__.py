"""Readers of other projects' files (data, never code): the official STAR/HRNet
checkpoints and the original dataset annotation formats.
"""
