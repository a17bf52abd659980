"""Checks before work: what `unlearn run` can check before the weights load, in a few seconds.

A run used to find a bad layer spec, a missing or empty data file or an unknown task only after
the model had loaded and the "before" evaluation had run, leaving a half-made run directory that
then blocked the name. :func:`preflight` checks, reading only and writing nothing:

- the model name resolves: an organism preset is known, a local folder is a model folder (or a
  run directory with ``model/``), a hub id is in the cache when ``HF_HUB_OFFLINE`` is set;
- each layer spec of the method's section against the model's depth, read from ``config.json``
  (a local folder, a run directory, the Hugging Face cache) or the organism preset, with the
  methods' own parsers (``validate`` in each method module);
- local data files exist, hold examples and have the named column (read here once and kept in
  the :class:`Plan`, so the run does not read them again); ``organism:`` corpora need an organism
  model (its cache is built, if missing, when the data load); ``hub:`` and named corpora are
  checked by their own fast hub probe when they load;
- every evaluation task name resolves (local question files are read) and the list is not empty;
- the run name is free, or the flags say what to do with the run found there
  (:func:`unlearning.core.rundir.start_mode`).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import try_to_load_from_cache

from unlearning.attacks.cells import Cell
from unlearning.attacks.in_context import InContextConfig, demonstration_pool
from unlearning.attacks.probe import ProbeConfig, entity_split
from unlearning.core.config import to_dict
from unlearning.core.errors import ConfigError, DataError, UserError
from unlearning.core.hub import hub_offline
from unlearning.core.runtime import world_size
from unlearning.core.rundir import RunDir, StartMode, check_writable, safe_name, start_mode
from unlearning.data.corpora import is_corpus
from unlearning.data.text import TextSource, load_texts, organism_corpus
from unlearning.methods import method_module
from unlearning.model.layers import parse_layer_spec
from unlearning.model.integrity import check_model_folder
from unlearning.model.loading import resolve_model_path, split_revision
from unlearning.model.meta import check_shardable, weight_shapes
from unlearning.organism import check_built
from unlearning.organism.presets import PRESETS
from unlearning import tasks as task_registry
from unlearning.organism.registry import is_organism_name, organism_preset, parse_organism_name

RunConfig = Any  # unlearning.runner.RunConfig (runner imports this module, so not the other way round)

log = logging.getLogger(__name__)

# Keys that may change when a run is resumed: where it runs and how it logs, not what it computes.
# output_dir is here because the run directory was found, so it names the same folder.
FREE_ON_RESUME = ("device", "output_dir", "logging.*", "eval.batch_size")
# The methods whose training runs on a model sharded by FSDP2 (training/fsdp.py): UNDO and TAR keep
# whole-tensor copies (noised parts, the adversary's functional copy) that sharding would split.
FSDP_METHODS = ("sequential", "checkpoint_transfer", "circuit_breaker", "rmu")
# Under FSDP the model is on the meta device while the method is set up (training/fsdp.py), so no
# set-up step may run it: these mask kinds score the forget tokens with the model.
MODEL_MASKS = ("activation", "probe", "sae")
DEPTH_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")  # config.json spellings
CORPORA = ("forget", "retain", "extra_retain")


@dataclass
class Plan:
    """What preflight found: the run goes ahead with these."""
    model_name: str
    organism: str | None  # the organism preset, for organism:* data and tasks
    depth: int | None  # None: not known before loading (a hub id not cached, a .gguf file)
    method_config: Any
    rundir: Path
    mode: StartMode
    record: dict[str, Any]  # what config.yaml holds
    changes: list[str] = field(default_factory=list)  # config changes a --force resume accepted
    texts: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # local corpora, already read


def resolved_model_name(name: str) -> str:
    if name == "auto":
        return "organism:small" if torch.cuda.is_available() else "organism:tiny"
    return name


def run_record(cfg: RunConfig, model_name: str, method_config: Any) -> dict[str, Any]:
    """config.yaml of a run: the config with the model resolved and the method's defaults filled in."""
    return {**to_dict(cfg), "model": model_name, cfg.method: to_dict(method_config)}


# ----------------------------------------------------------------------------------------------
# The model: does the name resolve, and how deep is it?


def local_model_folder(name: str, revision: str | None = None, key: str = "model") -> Path | None:
    """The folder (or .gguf file) a model name points to, found without downloading anything;
    None for a hub id that is not cached while the hub may be used (it is fetched when it loads).
    A name that cannot resolve is a one-line error naming ``key``."""
    base, rev = split_revision(name, revision)
    try:
        if Path(base).expanduser().exists() or hub_offline("TRANSFORMERS_OFFLINE"):
            return resolve_model_path(name, revision)  # a local path, or the cache only: no network
        try:
            cached = try_to_load_from_cache(base, "config.json", revision=rev)
        except ValueError:  # not a valid repo id (HFValidationError): resolving it says why, offline
            return resolve_model_path(name, revision)
        return Path(cached).parent if isinstance(cached, str) else None
    except UserError as e:
        raise type(e)(_rekey(str(e), "model", key)) from None


def _rekey(message: str, old: str, new: str) -> str:
    """Messages of shared helpers start with their own key (``model: ...``); name the caller's."""
    return new + message[len(old):] if message.startswith(old + ":") else f"{new}: {message}"


def folder_depth(folder: Path) -> int | None:
    """Decoder layers, from config.json; an adapter folder's base model; None for a .gguf file.

    Read as JSON rather than through transformers' AutoConfig: importing transformers takes seconds
    and preflight should fail in fewer."""
    if folder.is_file():
        return None
    config = folder / "config.json"
    if not config.is_file() and (folder / "adapter_config.json").is_file():
        base = json.loads((folder / "adapter_config.json").read_text()).get("base_model_name_or_path")
        return model_depth(base, None) if base else None
    if not config.is_file():
        return None
    data = json.loads(config.read_text())
    for section in (data, data.get("text_config") or {}):
        for k in DEPTH_KEYS:
            if isinstance(section.get(k), int):
                return section[k]
    return None


def model_depth(name: str, revision: str | None, key: str = "model") -> int | None:
    """The model's depth without loading it; the organism's from its preset (built or not)."""
    if is_organism_name(name):
        try:
            parsed = parse_organism_name(name, revision)
        except UserError as e:
            raise type(e)(_rekey(str(e), "model", key)) from None
        check_built(parsed.preset)  # a damaged cache now, not after the run has begun
        return PRESETS[parsed.preset].model.num_layers
    folder = local_model_folder(name, revision, key)
    if folder is not None and folder.is_dir():
        check_model_folder(folder)  # a truncated weights file now, not after the run has begun
    return folder_depth(folder) if folder is not None else None


def check_layers(cfg: RunConfig, method_config: Any, depth: int) -> None:
    """Every layer spec of the method's section: its own keys through the method's ``validate``,
    then the keys of the settings all methods share: ``lora.layers`` (LoRA), ``full_layers`` (full
    fine-tuning in the representation methods) and ``mask.layer`` (the token mask)."""
    method_module(cfg.method).validate(method_config, depth)
    section, finetune = cfg.method, getattr(method_config, "finetune", None)
    lora_layers = getattr(getattr(method_config, "lora", None), "layers", None)
    if finetune == "lora" and lora_layers is not None:
        parse_layer_spec(lora_layers, depth, field=f"{section}.lora.layers")
    full_layers = getattr(method_config, "full_layers", None)
    if finetune == "full" and full_layers is not None:
        parse_layer_spec(full_layers, depth, field=f"{section}.full_layers")
    mask_layer = getattr(getattr(method_config, "mask", None), "layer", None)
    if mask_layer is not None:
        parse_layer_spec([mask_layer], depth, field=f"{section}.mask.layer")


# ----------------------------------------------------------------------------------------------
# Data and tasks


def read_source(src: TextSource, key: str, organism: str | None, model: str) -> list[dict[str, Any]] | None:
    """A local data file's records (read once, kept for the run); None for organism, hub and named
    corpora, whose names are checked here and whose text loads later. ``key`` names the setting
    (``data.forget`` or ``attack.data``)."""
    source = src.source
    if source.startswith("organism:"):
        organism_corpus(source, organism, f"{key}.source", model)
        return None
    if source.startswith("hub:") or is_corpus(source):
        return None  # fetched when the data load, after the hub's own fast reachability probe
    try:
        return load_texts(src, organism)
    except DataError as e:  # the reader says "data.<corpus>.column": name the setting
        raise DataError(f"{key}.source: {str(e).replace('data.<corpus>.', f'{key}.')}") from None


def read_local_corpora(cfg: RunConfig, organism: str | None) -> dict[str, list[dict[str, Any]]]:
    """Read the local data files (kept for the run); check the names of the other sources."""
    texts = {}
    for name in CORPORA:
        src: TextSource | None = getattr(cfg.data, name)
        if src is None or (name == "extra_retain" and cfg.data.extra_retain_ratio <= 0):
            continue
        records = read_source(src, f"data.{name}", organism, cfg.model)
        if records is not None:
            texts[name] = records
    return texts


def check_fewshot(names: list[str], settings: Any, key: str) -> None:
    """``num_fewshot > 0``: every task has lm-eval's few-shot form, and local questions have dev rows
    for every subject (read now: local files are cheap, and a missing dev row must not wait for the
    after-training evaluation). ``key`` is the settings' section (``eval``)."""
    k = settings.num_fewshot
    if k <= 0:
        return
    if settings.fewshot_data and not Path(settings.fewshot_data).expanduser().exists():
        raise DataError(f"{key}.fewshot_data: {settings.fewshot_data} does not exist; give a dev file in "
                        "MMLU's columns (question, subject, choices, answer)")
    try:
        task_registry.check_fewshot_names(names, k)
        for name in names:
            if "=" in name or settings.fewshot_data:  # local questions or local dev rows: read them
                task_registry.get_tasks([name], **settings.task_context())
    except UserError as e:
        message = str(e)
        field = message.partition(":")[0]
        raise type(e)(_rekey(message, field, f"{key}.{field}") if field in ("num_fewshot", "fewshot_data")
                      else f"{key}.tasks: {message}") from None


def check_tasks(names: Any, key: str = "eval.tasks", settings: Any = None) -> None:
    """Each task resolves, without loading a model, an organism or a hub dataset: registered names
    are looked up (``NAME=PATH``: the file must exist), other names are read as local files.
    ``settings`` (an ``EvalSettings``): its few-shot choice is checked too (:func:`check_fewshot`)."""
    names = task_registry.split_task_names(names)
    if not names:
        raise ConfigError(f"{key}: no task named; give at least one, e.g. --{key} "
                          "organism_hazard_cloze,organism_general_cloze (the run evaluates before and after)")
    for name in names:
        registered, _, data_path = name.partition("=")
        if registered in task_registry.TASKS:
            if data_path and not Path(data_path).expanduser().exists():
                raise DataError(f"{key}: {name!r}: {data_path} does not exist")
            continue
        try:
            task_registry.get_tasks([name])  # a local question file (read and checked) or an error
        except UserError as e:
            raise type(e)(_rekey(str(e), "tasks", key)) from None
    if settings is not None:
        check_fewshot(names, settings, key.rpartition(".")[0] or key)


def preflight_attack(cfg: Any, key: str = "attack", read_data: bool = True) -> None:
    """An attack's checks before any folder is written or weights load (``cfg``: an AttackConfig):
    its model resolves and is whole, its local data file reads (``read_data``: the attack trains on
    it; a probe does not), under ``parallel fsdp`` its weights can be read after sharding, its tasks
    resolve."""
    model_name = resolved_model_name(cfg.model)
    organism = cfg.organism or organism_preset(model_name)
    model_depth(model_name, cfg.revision, key=f"{key}.model")
    if read_data and cfg.parallel == "fsdp" and world_size() > 1:  # it trains sharded: safetensors only
        check_shardable(model_name, revision=cfg.revision, key=f"{key}.parallel")
    if read_data:
        read_source(cfg.data, f"{key}.data", organism, cfg.model)
    check_tasks(cfg.eval.tasks, key=f"{key}.eval.tasks", settings=cfg.eval)


def preflight_grid(cells: list[Cell], probe: ProbeConfig, icl: InContextConfig) -> None:
    """An attack grid's checks before anything is written: each model, data file, task list and
    question set once (:func:`preflight_attack`), and the probe's entity split and the in-context
    demonstrations once per task, organism and seed (they read the questions a cell would)."""
    checked: set[tuple[Any, ...]] = set()
    for cell in cells:
        cfg = cell.attack
        what = (cfg.model, cfg.revision, cfg.data.source if cell.kind == "finetune" else None, tuple(cfg.eval.tasks))
        if what not in checked:
            checked.add(what)
            preflight_attack(cfg, read_data=cell.kind == "finetune")
        if cell.kind != "finetune" and (cell.kind, tuple(cfg.tasks), cfg.organism, cfg.seed) not in checked:
            checked.add((cell.kind, tuple(cfg.tasks), cfg.organism, cfg.seed))
            [task] = task_registry.get_tasks(cfg.tasks[:1], organism=cfg.organism or "tiny")
            if cell.kind == "probe":
                entity_split(task.questions, cfg.seed, probe.train_fraction)  # the probe reads every question
            else:
                demonstration_pool(icl.source, task, cfg.organism)


# ----------------------------------------------------------------------------------------------


def check_meta_build(method: str, method_config: Any) -> None:
    """Refuse the set-up steps that run the model while the method is built: under FSDP its
    weights load only after sharding, and the model is then on the meta device."""
    why = "runs the model while the method is set up, and under train.parallel fsdp the weights load only " \
          "after sharding"
    mask = getattr(method_config, "mask", None)
    if mask is not None and mask.kind in MODEL_MASKS:
        raise ConfigError(f"{method}.mask.kind: {mask.kind} {why}; use mask.kind keyword or hazard, "
                          f"or train.parallel ddp")
    if getattr(method_config, "steering_relative", False):
        raise ConfigError(f"{method}.steering_relative: measuring the activation norm {why}; give an absolute "
                          f"{method}.steering_coef, or use train.parallel ddp")


def check_sharded_teacher(model_name: str, revision: str | None, method_config: Any) -> None:
    """Under train.parallel fsdp ``checkpoint_transfer``'s teacher is sharded as the model is
    (``training/fsdp.shard_frozen``), which is wired for a teacher of the model's own architecture
    and size in safetensors: the teacher's tensors (names and shapes, from the files' headers) must
    be the model's. Else a one-line error naming checkpoint_transfer.checkpoint; ddp loads it whole."""
    from unlearning.methods.checkpoint_transfer import resolve_teacher  # lazy: one method's rule
    key, fix = "checkpoint_transfer.checkpoint", "use train.parallel ddp, which loads the teacher whole on every rank"
    name, teacher_revision = resolve_teacher(model_name, method_config.checkpoint, method_config.checkpoint_revision)
    model = weight_shapes(check_shardable(model_name, revision=revision))
    teacher = weight_shapes(check_shardable(name, revision=teacher_revision, key=key, parallel_key="train.parallel"))
    differ = sorted(set(model) ^ set(teacher)) or sorted(n for n in model if model[n] != teacher[n])
    if differ:
        where = differ[0]
        shapes = f"{teacher.get(where, 'absent')} in the teacher, {model.get(where, 'absent')} in the model"
        raise ConfigError(f"{key}: under train.parallel fsdp the teacher is sharded like the model and must have "
                          f"its architecture and size, but {name}{f' @ {teacher_revision}' if teacher_revision else ''} "
                          f"differs at {where} ({shapes}; {len(differ)} tensors differ); {fix}")


def preflight(cfg: RunConfig, *, resume: bool = False, overwrite: bool = False, force: bool = False) -> Plan:
    """Check everything that can be checked before the weights load; raise a one-line UserError
    naming the config key (and the fix) for the first problem. Writes nothing."""
    model_name = resolved_model_name(cfg.model)
    organism = organism_preset(model_name)
    method_config = cfg.method_config()
    record = run_record(cfg, model_name, method_config)
    rundir = RunDir(Path(cfg.output_dir) / (cfg.name or safe_name(f"{cfg.method}-{model_name}")), create=False)
    mode, changes = start_mode(rundir, record, resume=resume, overwrite=overwrite, force=force,
                               free=FREE_ON_RESUME)
    plan = Plan(model_name, organism, None, method_config, rundir.path, mode, record, changes)
    if mode == "complete":  # nothing will run
        return plan
    check_writable(rundir.path, "output_dir")
    if cfg.train.parallel == "fsdp" and cfg.method not in FSDP_METHODS:
        raise ConfigError(f"train.parallel: fsdp is wired for {', '.join(FSDP_METHODS)}, not {cfg.method} "
                          f"(its originals or adversary copies are whole tensors); use train.parallel ddp")
    if cfg.train.parallel == "fsdp" and world_size() > 1:
        check_meta_build(cfg.method, method_config)
        if cfg.method == "checkpoint_transfer":
            check_sharded_teacher(model_name, cfg.revision, method_config)
    plan.depth = model_depth(model_name, cfg.revision)
    if plan.depth is not None:
        check_layers(cfg, method_config, plan.depth)
    else:
        log.info("model %s: depth unknown before loading; layer specs are checked once it loads", model_name)
    plan.texts = read_local_corpora(cfg, organism)
    check_tasks(cfg.eval.tasks, settings=cfg.eval)
    reference = cfg.eval.reference
    if reference and reference != "auto":
        model_depth(reference, None, key="eval.reference")
    return plan
