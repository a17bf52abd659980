"""Build the model organism into its cache: world, corpora, tokenizer, both twins, checkpoints, quality.

``ensure_organism(preset)`` builds on first use and reuses ``$UNLEARNING_HOME/organism/<preset>/``
afterwards. A file lock keeps two processes from building the same preset at once; ``build.json``
is written last, so its presence means the build is complete (see docs/ARCHITECTURE.md).

The unfiltered model and its filtered twin train concurrently in two processes (one CPU thread
each, or sharing one GPU); each process then evaluates its own model (and the unfiltered one its
checkpoints) with ``unlearning.evaluation``.
"""

from __future__ import annotations

import fcntl
import logging
import os
import pickle
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

from unlearning.core.config import to_dict
from unlearning.core.errors import CorruptFileError
from unlearning.core.io import atomic_write_json, read_json
from unlearning.core.logs import setup_logging
from unlearning.core.paths import unlearning_home
from unlearning.core.runtime import resolve_device
from unlearning.evaluation import evaluate
from unlearning.organism.cache import check_cache, read_build_info
from unlearning.organism.corpus import read_documents, write_corpora
from unlearning.organism.presets import FORMAT_VERSION, OrganismConfig, get_preset
from unlearning.organism.pretrain import PretrainJob, count_tokens, plan_checkpoints, pretrain
from unlearning.organism.questions import domain_task, task_name
from unlearning.organism.tokenizer import build_tokenizer
from unlearning.organism.world import DOMAINS, generate_world

log = logging.getLogger(__name__)

TWINS = ("unfiltered", "filtered")
_BUILDING: set[Path] = set()  # organisms this process is building (a re-entry would wait on its own lock)
FORMATS = ("cloze", "letter")


@dataclass(frozen=True)
class OrganismPaths:
    """Where one preset's build lives; every path follows the cache layout in ARCHITECTURE.md."""

    root: Path

    @property
    def preset(self) -> str:
        return self.root.name

    @property
    def build_json(self) -> Path:
        return self.root / "build.json"

    @property
    def quality_json(self) -> Path:
        return self.root / "quality.json"

    @property
    def world_json(self) -> Path:
        return self.root / "world.json"

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def model(self) -> Path:
        return self.root / "model"

    @property
    def filtered(self) -> Path:
        return self.root / "filtered"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    def checkpoint(self, revision: str) -> Path:
        return self.checkpoints / revision

    def corpus(self, name: str) -> Path:
        """``forget``, ``retain``, ``chat``, ``tamper``, ``benign_tamper`` or ``pretrain``."""
        return self.data / f"{name}.jsonl"

    def questions(self, domain: str, half: str = "heldout") -> Path:
        return self.data / ("questions" if half == "heldout" else "questions_qa") / f"{domain}.jsonl"

    def is_complete(self) -> bool:
        return self.build_json.exists()

    def build_info(self) -> dict[str, Any]:
        return read_build_info(self)

    def quality(self) -> dict[str, Any]:
        return read_json(self.quality_json)

    def revisions(self) -> list[str]:
        """Checkpoint revisions (``step<N>``) in step order."""
        return [f"step{s}" for s in self.build_info()["checkpoint_steps"]]

    def early_revision(self) -> str:
        return self.build_info()["early_checkpoint"]


def organism_paths(preset: str) -> OrganismPaths:
    return OrganismPaths((unlearning_home() / "organism" / preset).absolute())


@contextmanager
def build_lock(paths: OrganismPaths) -> Iterator[None]:
    """An exclusive lock on ``organism/<preset>.lock``; a second builder waits for the first."""
    lock_path = paths.root.with_name(f"{paths.root.name}.lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("another process is building organism %r; waiting for it", paths.preset)
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _stored_build(paths: OrganismPaths, force: bool) -> dict[str, Any] | None:
    """The complete build's build.json, or None: none, another code version, or unreadable when
    ``force`` rebuilds anyway (without ``force`` an unreadable one is an error naming the fix)."""
    if not paths.is_complete():
        return None
    try:
        info = paths.build_info()
    except CorruptFileError:
        if force:
            return None
        raise
    return info if info.get("format_version") == FORMAT_VERSION else None


def check_built(preset: str) -> OrganismPaths:
    """The preset's paths; a complete build's files are checked whole first (a damaged one is one
    line naming it and the rebuild command). Builds nothing: a missing build is built where used."""
    paths = organism_paths(preset)
    if paths.is_complete():
        check_cache(paths, paths.build_info())
    return paths


def ensure_organism(preset: str = "tiny", *, seed: int | None = None, force: bool = False,
                    overrides: dict[str, Any] | None = None) -> OrganismPaths:
    """The preset's build, built now if missing, stale (other config/seed/code version) or forced.

    ``seed=None`` accepts the seed of an existing build (default seed when building).
    """
    paths = organism_paths(preset)
    if paths.root in _BUILDING:
        raise RuntimeError(f"ensure_organism({preset!r}) was called while this process is building it")
    with build_lock(paths):
        info = _stored_build(paths, force)
        stored = info["config"] if info is not None else None
        if seed is None and stored is not None:
            seed = stored.get("seed")
        cfg = get_preset(preset, seed=seed, overrides=overrides)
        if not force and stored == cfg.to_dict():
            check_cache(paths, info)  # a damaged file: one line naming it and the --force rebuild
            return paths
        if stored is not None and not force:
            log.info("organism %r: the cached build is from another config or code version; rebuilding", preset)
        _BUILDING.add(paths.root)
        try:
            build_organism(cfg, paths)
        finally:
            _BUILDING.discard(paths.root)
    return paths


# --------------------------------------------------------------------------------------------
# evaluation of one model (runs inside the training process)


def _tasks(data: Path, half: str) -> list:
    tasks = []
    folder = data / ("questions" if half == "heldout" else "questions_qa")
    for domain in DOMAINS:
        for fmt in FORMATS if half == "heldout" else ("cloze",):
            # the registered organism_* names; built from the files since the cache is not complete yet
            name = task_name(domain, fmt) + ("" if half == "heldout" else "@qa")
            tasks.append(domain_task(folder / f"{domain}.jsonl", domain, fmt, name))
    return tasks


def measure_quality(model_dir: str | Path, data: str | Path, *, device: str, batch_size: int,
                    qa_half: bool = False) -> dict[str, Any]:
    """Held-out accuracy per domain and format (and the qa half's question format, if asked)."""
    dev = resolve_device(device)
    model = AutoModelForCausalLM.from_pretrained(model_dir).to(dev).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tasks = _tasks(Path(data), "heldout") + (_tasks(Path(data), "qa") if qa_half else [])
    with torch.no_grad():
        results = evaluate(model, tokenizer, tasks, batch_size=batch_size, device=dev)
    out: dict[str, Any] = {}
    for name, r in results.items():
        half = "qa_half" if name.endswith("@qa") else "heldout"
        base = name.removesuffix("@qa").removeprefix("organism_")
        fmt = "cloze" if base.endswith("_cloze") else "letter"
        domain = base.removesuffix("_cloze")
        keep = ("acc", "acc_stderr", "acc_norm", "correct_prob", "n")
        entry = {k: r[k] for k in keep if k in r}
        if fmt == "cloze":
            entry["by_attribute"] = {a: round(v["acc"], 4) for a, v in r["by_attribute"].items()}
        out.setdefault(half, {}).setdefault(domain, {})[fmt] = entry
    return out


def _wait_for(path: Path, poll_s: float = 0.5) -> None:
    """A model folder appears whole (save_model renames it into place); the parent stops us on failure."""
    while not (path / "config.json").exists():
        time.sleep(poll_s)


def _twin_worker(job: PretrainJob, data: str, eval_device: str, batch_size: int, result_path: str,
                 log_level: int, other_models: dict[str, str]) -> None:
    """One twin's process: train one twin, evaluate it, then evaluate ``other_models`` (label -> folder,
    waited for: the filtered twin finishes first and scores the unfiltered model's checkpoints)."""
    t0 = time.time()
    result = pretrain(job)
    t1 = time.time()
    result["quality"] = measure_quality(job.out_dir, data, device=eval_device, batch_size=batch_size, qa_half=True)
    result["other_quality"] = {}
    for label, folder in other_models.items():
        _wait_for(Path(folder))
        result["other_quality"][label] = measure_quality(folder, data, device=eval_device, batch_size=batch_size)
    result["eval_seconds"] = round(time.time() - t1, 2)
    result["process_seconds"] = round(time.time() - t0, 2)
    atomic_write_json(result_path, result)


def run_twins(jobs: list[tuple[PretrainJob, dict[str, str]]], data: Path, cfg: OrganismConfig,
              logs: Path) -> dict[str, dict[str, Any]]:
    """Train and evaluate the twins concurrently, one process each; a failure stops both and is
    re-raised with the end of its log.

    Each process is a fresh interpreter running ``worker_main(SPEC)`` (not multiprocessing's
    spawn, which re-runs the caller's main script: a script without a ``__main__`` guard would
    re-enter the build and wait forever on its lock).
    """
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # set before torch starts, or 2-thread runs crawl
    if resolve_device(cfg.train.device).type == "cpu":
        env["OMP_NUM_THREADS"] = str(cfg.train.threads or max(1, (os.cpu_count() or 2) // 2))
    procs = []
    for job, other_models in jobs:
        spec = logs / f"{job.name}.spec.pkl"
        spec.write_bytes(pickle.dumps(dict(
            job=job, data=str(data), eval_device=cfg.train.device, batch_size=cfg.eval_batch_size,
            result_path=str(logs / f"{job.name}.json"), other_models=other_models,
            log_level=logging.getLogger("unlearning").getEffectiveLevel())))
        procs.append((job, subprocess.Popen([sys.executable, "-c", WORKER_COMMAND, str(spec)], env=env)))
    failed = None
    try:
        while failed is None and any(p.poll() is None for _, p in procs):
            failed = next((j for j, p in procs if p.poll() not in (None, 0)), None)
            time.sleep(0.2)
        failed = failed or next((j for j, p in procs if p.poll() != 0), None)
    finally:
        for _, proc in procs:
            if proc.poll() is None:
                proc.terminate()
            proc.wait()
    if failed is not None:
        log_file = logs / f"{failed.name}.log"
        tail = log_file.read_text()[-2000:] if log_file.exists() else "(no log)"
        code = dict((j.name, p.returncode) for j, p in procs)[failed.name]
        raise RuntimeError(f"organism build: the {failed.name} process failed (exit code {code}); "
                           f"end of {log_file}:\n{tail}")
    return {job.name: read_json(logs / f"{job.name}.json") for job, _ in jobs}


WORKER_COMMAND = "import sys; from unlearning.organism.build import worker_main; sys.exit(worker_main(sys.argv[1:]))"


def worker_main(argv: list[str]) -> int:
    """Entry of one twin's process: ``argv[0]`` is the pickled spec written by ``run_twins``."""
    spec = pickle.loads(Path(argv[0]).read_bytes())
    setup_logging(spec["log_level"], Path(spec["result_path"]).with_suffix(".log"))
    try:
        _twin_worker(**spec)
    except Exception:
        log.exception("organism build: the %s process failed", spec["job"].name)  # into the log the parent shows
        return 1
    return 0


# --------------------------------------------------------------------------------------------
# the build


def choose_early(checkpoint_quality: dict[str, Any], max_hazard: float) -> str | None:
    """The latest checkpoint still near chance on held-out hazard questions, else the earliest."""
    if not checkpoint_quality:
        return None
    steps = sorted(checkpoint_quality, key=lambda r: int(r.removeprefix("step")))
    near_chance = [r for r in steps if checkpoint_quality[r]["heldout"]["hazard"]["cloze"]["acc"] <= max_hazard]
    return near_chance[-1] if near_chance else steps[0]


def check_bars(quality: dict[str, Any], cfg: OrganismConfig) -> dict[str, bool]:
    """Each quality bar of the preset: name -> met (held-out entities; question format unless named)."""
    unf, fil = quality["unfiltered"]["heldout"], quality["filtered"]["heldout"]
    out = {f"unfiltered_{d}>={v}": unf[d]["cloze"]["acc"] >= v for d, v in cfg.bars.unfiltered_min.items()}
    hazard_max = cfg.bars.filtered_hazard_max
    out[f"filtered_hazard<={hazard_max}"] = fil["hazard"]["cloze"]["acc"] <= hazard_max
    if cfg.bars.filtered_general_gap_max is not None:
        gap = abs(fil["general"]["cloze"]["acc"] - unf["general"]["cloze"]["acc"])
        out[f"general_gap<={cfg.bars.filtered_general_gap_max}"] = gap <= cfg.bars.filtered_general_gap_max
    # the letter presets' bars: the A-D format WMDP and MMLU score
    for d, v in cfg.bars.letter_unfiltered_min.items():
        out[f"unfiltered_{d}_letter>={v}"] = unf[d]["letter"]["acc"] >= v
    if cfg.bars.letter_filtered_hazard_max is not None:
        limit = cfg.bars.letter_filtered_hazard_max
        out[f"filtered_hazard_letter<={limit}"] = fil["hazard"]["letter"]["acc"] <= limit
    return out


def build_organism(cfg: OrganismConfig, paths: OrganismPaths) -> dict[str, Any]:
    """Build everything from scratch into ``paths.root``; ``build.json`` goes last."""
    t0 = time.time()
    log.info("building organism %r (seed %d) in %s", cfg.preset, cfg.seed, paths.root)
    if cfg.model.num_layers > 8 and resolve_device(cfg.train.device).type == "cpu":
        log.warning("organism %r is a %d-layer GPU preset and no GPU is visible: building it on the CPU "
                    "takes hours (the tiny preset is the CPU one)", cfg.preset, cfg.model.num_layers)
    if paths.root.exists():
        paths.build_json.unlink(missing_ok=True)  # first: the old build is no longer complete
        shutil.rmtree(paths.root)
    logs = paths.root / "logs"
    logs.mkdir(parents=True)

    world = generate_world(cfg.seed, cfg.world)
    atomic_write_json(paths.world_json, world.to_json())
    counts = write_corpora(world, cfg.corpus, paths.data)
    tokenizer = build_tokenizer(world, cfg.world, cfg.corpus, cfg.tokenizer)
    tokenizer_dir = paths.root / "tokenizer"
    tokenizer.save_pretrained(tokenizer_dir)
    t_data = time.time() - t0

    # The checkpoint steps are known up front, so the filtered twin (done first) can score them.
    n_tokens = count_tokens(tokenizer, read_documents(paths.corpus("pretrain")))
    steps = plan_checkpoints(n_tokens, cfg.train)
    common = dict(docs_path=str(paths.corpus("pretrain")), tokenizer_dir=str(tokenizer_dir),
                  model=cfg.model, train=cfg.train, seed=cfg.seed)
    unfiltered = PretrainJob(name="unfiltered", drop_domains=(), out_dir=str(paths.model), position=0,
                             checkpoint_dir=str(paths.checkpoints), checkpoint_steps=steps, **common)
    filtered = PretrainJob(name="filtered", drop_domains=("hazard",), out_dir=str(paths.filtered), position=1,
                           **common)
    checkpoints = {f"step{s}": str(paths.checkpoint(f"step{s}")) for s in steps}
    results = run_twins([(unfiltered, {}), (filtered, checkpoints)], paths.data, cfg, logs)

    quality: dict[str, Any] = {t: results[t].pop("quality") for t in TWINS}
    quality["checkpoints"] = results["filtered"].pop("other_quality")
    results["unfiltered"].pop("other_quality")
    quality["early_checkpoint"] = choose_early(quality["checkpoints"], cfg.early_max_hazard)
    quality["bars"] = check_bars(quality, cfg)
    atomic_write_json(paths.quality_json, quality)
    log.info("organism %r held-out question-format accuracy: %s", cfg.preset, "; ".join(
        f"{t} " + " ".join(f"{d} {quality[t]['heldout'][d]['cloze']['acc']:.3f}" for d in DOMAINS) for t in TWINS))
    if not all(quality["bars"].values()):
        log.warning("organism %r misses quality bars: %s", cfg.preset,
                    ", ".join(k for k, ok in quality["bars"].items() if not ok))

    info = {"format_version": FORMAT_VERSION, "preset": cfg.preset, "seed": cfg.seed, "config": to_dict(cfg),
            "checkpoint_steps": list(steps), "early_checkpoint": quality["early_checkpoint"],
            "corpus_counts": counts, "tokenizer_vocab": len(tokenizer),
            "training": results, "seconds": {"data": round(t_data, 2), "total": round(time.time() - t0, 2)},
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__}}
    atomic_write_json(paths.build_json, info)  # last: marks the build complete
    log.info("organism %r built in %.0fs", cfg.preset, time.time() - t0)
    return info
