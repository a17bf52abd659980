"""Foundations every layer uses: typed configs, errors, atomic files, paths, runtime, logging, run directories."""
