"""Input data: annotations, transforms, targets, pipelines, datasets."""
