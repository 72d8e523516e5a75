"""Training and evaluation: pure train/eval steps and the loop, checkpoints and the
best model, the workdir lock, fine-tuning, the device mapping, logs and plots.
"""
