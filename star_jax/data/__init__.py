"""Input data: annotations, transforms, targets, pipelines, datasets."""

import os

# TensorFlow (imported by the pipeline modules) logs INFO lines at import; keep warnings only.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
