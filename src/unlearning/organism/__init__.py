"""The model organism: a generated world of fictional facts and GPT-NeoX twins pretrained on it.

``ensure_organism("tiny")`` builds (or reuses) the cache; model names such as ``organism:tiny``,
``organism:tiny-filtered`` and ``organism:tiny@step20`` resolve through ``resolve_organism`` (and
``organism_preset`` names the preset behind a model or run directory). The organism's evaluation
tasks register from ``unlearning.organism.tasks`` (imported by ``unlearning.tasks``).
"""

from unlearning.organism.build import OrganismPaths, check_built, ensure_organism, organism_paths
from unlearning.organism.presets import PRESETS, OrganismConfig, get_preset
from unlearning.organism.registry import is_organism_name, organism_preset, parse_organism_name, resolve_organism

__all__ = ["OrganismPaths", "OrganismConfig", "PRESETS", "check_built", "ensure_organism", "get_preset", "organism_paths",
           "is_organism_name", "organism_preset", "parse_organism_name", "resolve_organism"]
