"""Files and sources: model specs, zoo downloads, checkpoints, artifacts, atomic writes."""
