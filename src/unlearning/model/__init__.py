"""Models: loading by name (organism, local folder, run directory, hub), layer access, the original-model probe, affine maps."""
