"""Input data: annotations, transforms, targets, sources, pipelines, datasets."""
