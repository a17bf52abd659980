"""lm-evaluation-harness 0.4.13 as the reference of the evaluation benchmark (issue 18), offline.

Two measurements on the project's own questions (``Task`` objects from ``unlearning.tasks.get_tasks``,
or plain ``MCQuestion`` lists):

* :func:`lmeval_scores`: lm-eval's ``HFLM`` scores a model already loaded in this process, at a given
  batch size (``"auto"`` included). lm-eval's own task machinery builds the requests (its WMDP and
  MMLU templates, read from local task files, see below); only ``HFLM.loglikelihood`` over all the
  requests is timed: lm-eval's scoring loop, as ``lm_eval.evaluator.evaluate`` calls it. Returns
  per-question log-likelihoods, predictions and that wall time.
* :func:`time_lmeval_command`: lm-eval's whole command, ``python3 -m lm_eval run --model hf
  --model_args pretrained=DIR,dtype=bfloat16 --tasks ... --batch_size auto --include_path TASKS``,
  in a subprocess with the hub off, timed from start to exit (start-up, task indexing, dataset
  loading, scoring, metrics).

Local task definitions (:func:`write_lmeval_tasks`): one YAML per task that ``include``\\ s lm-eval's
own template (``tasks/wmdp/_default_template_yaml``, or ``tasks/mmlu/default/_default_template_yaml``
for an ``mmlu_<subject>`` task) and sets ``dataset_path: json`` with ``data_files`` pointing at JSONL
files in the hub datasets' columns (WMDP: question, choices, answer; MMLU: question, subject,
choices, answer, a ``test`` and, when the task carries its dev rows, a ``dev`` file), plus a group
``<prefix>_all`` aggregated as lm-eval's ``mmlu`` (``weight_by_size``).

On the GPU machine lm-eval is not installed; carry the wheels (docs in benchmarks/README.md):

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \\
        --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PYTHONPATH

Command line (prints one JSON object and writes it to ``--out``)::

    python3 benchmarks/lmeval_reference.py --model DIR [--random-neox [--shape 6.9b|tiny]] \\
        --tasks mmlu=test.parquet[,wmdp_bio=wmdp.parquet] [--fewshot-data dev.parquet] [--num-fewshot K] \\
        [--batch-size auto N ...] [--compare] [--command] [--limit N] [--dtype bfloat16|float32] [--out F]

``--random-neox`` builds issue 18's random-weight GPT-NeoX (``--shape 6.9b``; ``tiny`` for a check)
with the GPT-NeoX-20B tokenizer of the real data, saves it to ``--model`` (for later calls and
lm-eval's command) and scores the one in memory. ``--compare`` also runs the project's ``evaluate`` on the same
questions and reports, per lm-eval batch size, the share of identical predictions and the largest
log-likelihood difference. ``--fewshot-data`` gives lm-eval's MMLU tasks their dev split, as on the hub
(it is read at set-up even zero-shot).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the benchmarks' shared model builder

from random_neox import NEOX_SHAPES, peak_tflops, save_random_neox  # noqa: E402
from unlearning.evaluation.prompts import build_prompt, subject_header  # noqa: E402
from unlearning.evaluation.tasks import MCQuestion, Task  # noqa: E402

LM_EVAL_VERSION = "0.4.13"
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def lm_eval_tasks_dir() -> Path:
    import lm_eval
    return Path(lm_eval.__file__).parent / "tasks"


def check_lm_eval() -> str:
    import lm_eval
    version = getattr(lm_eval, "__version__", "?")
    if version != LM_EVAL_VERSION:
        raise SystemExit(f"lm-eval {version} is installed; this reference is lm-eval {LM_EVAL_VERSION}")
    return version


# ---------------------------------------------------------------------------------------------
# our questions -> lm-eval task files


def as_tasks(questions: Sequence[MCQuestion] | Sequence[Task], subject: str = "biology") -> list[Task]:
    """Tasks as given, or plain questions grouped by their ``subject`` (``subject`` when empty): an
    MMLU subject becomes ``mmlu_<subject>``, anything else a WMDP-style task with its header."""
    if all(isinstance(q, Task) for q in questions):
        return list(questions)  # type: ignore[arg-type]
    from unlearning.evaluation.benchmarks import MMLU_SUBJECTS
    groups: dict[str, list[MCQuestion]] = {}
    for q in questions:  # type: ignore[union-attr]
        groups.setdefault(q.subject or subject, []).append(q)
    return [Task(name=f"mmlu_{s}" if s in MMLU_SUBJECTS else f"mc_{s.replace(' ', '_')}", questions=qs, subject=s)
            for s, qs in groups.items()]


def _row(q: MCQuestion, subject: str | None) -> dict[str, Any]:
    row = {"question": q.question, "choices": list(q.choices), "answer": int(q.answer)}
    return {**row, "subject": subject} if subject is not None else row


def _jsonl(path: Path, rows: list[dict[str, Any]]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def write_lmeval_tasks(folder: str | Path, tasks: Sequence[Task], prefix: str = "ref") -> list[str]:
    """lm-eval task YAMLs (and their JSONL data) for ``tasks`` in ``folder``; returns the leaf task
    names in order. A group ``<prefix>_all`` over all of them is written too."""
    folder = Path(folder)
    data = folder / "data"
    data.mkdir(parents=True, exist_ok=True)
    templates = lm_eval_tasks_dir()
    names = []
    for task in tasks:
        if task.format != "letter":
            raise ValueError(f"task {task.name}: only the letter format (WMDP/MMLU) has an lm-eval reference here")
        name = f"{prefix}_{task.name}"
        mmlu = task.name.startswith("mmlu_")
        subject = task.name[len("mmlu_"):] if mmlu else None
        files = {"test": _jsonl(data / f"{name}.test.jsonl", [_row(q, subject) for q in task.questions])}
        config: dict[str, Any] = {"task": name, "dataset_path": "json",
                                  "description": task.description if task.description is not None
                                  else subject_header(task.subject)}
        if mmlu:
            config["include"] = str(templates / "mmlu" / "default" / "_default_template_yaml")
            if task.fewshot:
                files["dev"] = _jsonl(data / f"{name}.dev.jsonl", [_row(q, subject) for q in task.fewshot])
            else:  # no dev rows given: no few-shot split (zero-shot prompts are the same)
                config["fewshot_split"] = None
        else:
            config["include"] = str(templates / "wmdp" / "_default_template_yaml")
        config["dataset_kwargs"] = {"data_files": files}
        (folder / f"{name}.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        names.append(name)
    group = {"group": f"{prefix}_all", "task": names,
             "aggregate_metric_list": [{"metric": "acc", "aggregation": "mean", "weight_by_size": True}],
             "metadata": {"version": 1}}
    (folder / f"{prefix}_all.yaml").write_text(yaml.safe_dump(group, sort_keys=False))
    return names


# ---------------------------------------------------------------------------------------------
# in-process scoring


@dataclass
class LmEvalScores:
    """lm-eval's results for the questions, in the order given (tasks flattened)."""
    loglikelihoods: list[list[float]]
    predictions: list[int]
    seconds: float  # HFLM.loglikelihood over every request: the scoring loop alone
    requests: int
    batch_size: Any  # as asked ("auto" or a number)
    detected_batch_size: int | None = None  # what "auto" chose
    prompts: list[str] = field(default_factory=list)
    setup_seconds: float = 0.0  # task loading and request building (not in ``seconds``)

    def summary(self) -> dict[str, Any]:
        n = len(self.predictions)
        return {"questions": n, "requests": self.requests, "batch_size": self.batch_size,
                "detected_batch_size": self.detected_batch_size, "scoring_s": round(self.seconds, 3),
                "setup_s": round(self.setup_seconds, 3)}


def _sync(model) -> None:
    import torch
    device = next(model.parameters()).device
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def lmeval_scores(model, tokenizer, questions: Sequence[MCQuestion] | Sequence[Task], *, batch_size: int | str = 32,
                  num_fewshot: int = 0, max_length: int | None = None, subject: str = "biology",
                  max_batch_size: int = 64, workdir: str | Path | None = None) -> LmEvalScores:
    """lm-eval's HFLM scores of ``questions`` on ``model`` (loaded, on its device), lm-eval's requests."""
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager, get_task_dict

    check_lm_eval()
    tasks = as_tasks(questions, subject)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        names = write_lmeval_tasks(tmp, tasks)
        task_dict = get_task_dict(names, TaskManager(include_path=tmp, include_defaults=False))
        instances = []
        for name in names:
            their = task_dict[name]
            if num_fewshot:
                their.set_config(key="num_fewshot", value=num_fewshot)
            their.build_all_requests(rank=0, world_size=1)
            instances.extend(their.instances)
    kwargs = {"max_length": max_length} if max_length else {}
    hflm = HFLM(pretrained=model, tokenizer=tokenizer, backend="causal", batch_size=batch_size,
                max_batch_size=max_batch_size, **kwargs)
    setup = time.perf_counter() - start

    _sync(model)
    start = time.perf_counter()
    responses = hflm.loglikelihood(instances, disable_tqdm=True)
    _sync(model)
    seconds = time.perf_counter() - start

    by_doc: dict[tuple[str, int], dict[int, float]] = {}
    prompts: dict[tuple[str, int], str] = {}
    for inst, (ll, _) in zip(instances, responses, strict=True):
        by_doc.setdefault((inst.task_name, inst.doc_id), {})[inst.idx] = float(ll)
        prompts[(inst.task_name, inst.doc_id)] = inst.arguments[0]
    lls, order = [], []
    for name, task in zip(names, tasks):
        for doc_id, q in enumerate(task.questions):
            got = by_doc[(name, doc_id)]
            lls.append([got[i] for i in range(len(q.choices))])
            order.append((name, doc_id))
    detected = getattr(hflm, "batch_sizes", None) or {}
    return LmEvalScores(loglikelihoods=lls, predictions=[max(range(len(x)), key=x.__getitem__) for x in lls],
                        seconds=seconds, requests=len(instances), batch_size=batch_size,
                        detected_batch_size=max(detected.values()) if detected else None,
                        prompts=[prompts[k] for k in order], setup_seconds=setup)


def prompt_tokens(tokenizer, tasks: Sequence[Task]) -> int:
    """Tokens of every question's zero-shot prompt, each counted once (the four answers share it)."""
    contexts = [build_prompt(t.format, q.question, q.choices, q.subject or t.subject, t.description)[0]
                for t in tasks for q in t.questions]
    return sum(len(ids) for ids in tokenizer(contexts)["input_ids"])


def mfu(params: int, tokens: int, seconds: float, peak: float | None) -> float | None:
    """Model-FLOPs utilisation of a forward over ``tokens``: 2 x params x tokens per second / the peak."""
    return round(2 * params * tokens / seconds / (peak * 1e12), 3) if peak and seconds > 0 else None


def compare(ours: Sequence[Sequence[float]], theirs: LmEvalScores) -> dict[str, Any]:
    """Share of identical predictions and the largest |log-likelihood difference|."""
    assert len(ours) == len(theirs.loglikelihoods)
    same = sum(max(range(len(o)), key=o.__getitem__) == p for o, p in zip(ours, theirs.predictions))
    diff = max(abs(a - b) for o, t in zip(ours, theirs.loglikelihoods) for a, b in zip(o, t))
    return {"same_predictions": same / len(ours), "max_abs_ll_diff": diff, "questions": len(ours)}


def our_loglikelihoods(model, tokenizer, tasks: Sequence[Task], *, batch_size: int = 32, num_fewshot: int = 0,
                       max_length: int | None = None) -> tuple[list[list[float]], float]:
    """The project's per-question log-likelihoods (``evaluate`` with samples) and its wall time."""
    from unlearning.evaluation import evaluate
    _sync(model)
    start = time.perf_counter()
    # the weights' own precision, as lm-eval computes: no bf16 autocast for an fp32 model
    results = evaluate(model, tokenizer, list(tasks), batch_size=batch_size, log_samples=True,
                       num_fewshot=num_fewshot, max_length=max_length, mixed_precision=False)
    _sync(model)
    seconds = time.perf_counter() - start
    return [s["loglikelihoods"] for t in tasks for s in results[t.name]["samples"]], seconds


# ---------------------------------------------------------------------------------------------
# the whole command


def lmeval_command(model_dir: str | Path, include_path: str | Path, tasks: Sequence[str], *,
                   batch_size: str = "auto", dtype: str = "bfloat16", device: str = "cuda",
                   output_path: str | Path | None = None, num_fewshot: int | None = None) -> list[str]:
    """``python3 -m lm_eval run --model hf ...`` (the console script ``lm_eval`` is the same entry point)."""
    argv = [sys.executable, "-m", "lm_eval", "run", "--model", "hf",
            "--model_args", f"pretrained={model_dir},dtype={dtype}", "--tasks", ",".join(tasks),
            "--batch_size", str(batch_size), "--device", device, "--include_path", str(include_path)]
    if num_fewshot is not None:
        argv += ["--num_fewshot", str(num_fewshot)]
    if output_path is not None:
        argv += ["--output_path", str(output_path)]
    return argv


def time_lmeval_command(model_dir: str | Path, include_path: str | Path, tasks: Sequence[str], *,
                        batch_size: str = "auto", dtype: str = "bfloat16", device: str = "cuda",
                        num_fewshot: int | None = None, timeout: float = 1800) -> dict[str, Any]:
    """Run and time lm-eval's whole command offline (a fresh datasets cache: a first run's set-up)."""
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, **OFFLINE_ENV, "HF_DATASETS_CACHE": str(Path(tmp) / "datasets")}
        argv = lmeval_command(model_dir, include_path, tasks, batch_size=batch_size, dtype=dtype, device=device,
                              output_path=Path(tmp) / "out", num_fewshot=num_fewshot)
        start = time.perf_counter()
        proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout)
        seconds = time.perf_counter() - start
        if proc.returncode != 0:
            raise RuntimeError(f"lm_eval exited {proc.returncode}: {proc.stderr[-3000:]}")
        found = sorted((Path(tmp) / "out").rglob("results_*.json"))
        results = json.loads(found[-1].read_text())["results"] if found else {}
    return {"argv": argv, "seconds": seconds, "acc": {k: v.get("acc,none") for k, v in results.items()}}


# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a model folder (HF layout, tokenizer included); with "
                                                       "--random-neox, where the random one is saved")
    parser.add_argument("--random-neox", action="store_true",
                        help="build a random GPT-NeoX of --shape, save it to --model and score it (not reloaded)")
    parser.add_argument("--shape", default="6.9b", choices=tuple(NEOX_SHAPES))
    parser.add_argument("--tasks", required=True, help="our task names, e.g. mmlu=test.parquet,wmdp_bio=wmdp.parquet")
    parser.add_argument("--fewshot-data", default=None, help="MMLU dev rows: lm-eval's tasks get their dev split")
    parser.add_argument("--num-fewshot", type=int, default=0)
    parser.add_argument("--batch-size", nargs="+", default=["auto"], help="each is timed: auto and/or numbers")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--limit", type=int, default=None, help="first N questions of each task")
    parser.add_argument("--no-in-process", dest="in_process", action="store_false",
                        help="skip the in-process scoring (time the command alone)")
    parser.add_argument("--command", action="store_true", help="also time lm-eval's whole command")
    parser.add_argument("--compare", action="store_true", help="also run ours and compare")
    parser.add_argument("--our-batch-size", type=int, nargs="+", default=[32],
                        help="each is timed; 'ours' reports the fastest, 'ours_by_batch' all")
    parser.add_argument("--out", default=None, help="also write the JSON here")
    args = parser.parse_args(argv)

    import dataclasses

    import torch
    import transformers

    from unlearning.tasks import get_tasks

    report: dict[str, Any] = {"lm_eval": check_lm_eval(), "torch": torch.__version__,
                              "transformers": transformers.__version__, "device": args.device,
                              "dtype": args.dtype, "tasks": args.tasks, "num_fewshot": args.num_fewshot}
    from importlib.metadata import version
    # carried with --no-deps: datasets 5.2.0 wants pyarrow >= 24 and fsspec 2023.1-2026.9 (see the report)
    report["versions"] = {name: version(name) for name in ("datasets", "pyarrow", "fsspec", "huggingface-hub")}
    if torch.cuda.is_available() and args.device.startswith("cuda"):
        report["device_name"] = torch.cuda.get_device_name()
    # dev rows load whenever given, so lm-eval's MMLU tasks read a dev split as they do on the hub
    load_k = max(args.num_fewshot, 1) if args.fewshot_data else 0
    tasks = get_tasks(args.tasks, num_fewshot=load_k, fewshot_data=args.fewshot_data)
    if args.limit:
        tasks = [dataclasses.replace(t, questions=t.questions[:args.limit]) for t in tasks]
    report["questions"] = sum(len(t.questions) for t in tasks)

    start = time.perf_counter()
    if args.random_neox:
        model, tokenizer = save_random_neox(args.model, args.shape, device=args.device, dtype=args.dtype)
        report["model"] = f"random GPT-NeoX {args.shape}, saved to {args.model}"
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(args.model, torch_dtype=getattr(torch, args.dtype))
        model = model.to(args.device).eval()
        tokenizer = transformers.AutoTokenizer.from_pretrained(args.model)
        report["model"] = args.model
    report["load_s"] = round(time.perf_counter() - start, 1)
    params = sum(p.numel() for p in model.parameters())
    peak = peak_tflops(args.device)
    report.update(params=params, peak_tflops=peak, prompt_tokens=prompt_tokens(tokenizer, tasks) if not args.num_fewshot else None)

    report["in_process"] = {}
    for bs in args.batch_size if args.in_process else []:
        scores = lmeval_scores(model, tokenizer, tasks, batch_size=bs if bs.startswith("auto") else int(bs),
                               num_fewshot=args.num_fewshot)
        report["in_process"][bs] = scores.summary()
        report["in_process"][bs]["mfu"] = mfu(params, report["prompt_tokens"] or 0, scores.seconds, peak)
        if args.compare:
            if "ours" not in report:
                report["ours_by_batch"] = {}
                for our_bs in args.our_batch_size:
                    ours, seconds = our_loglikelihoods(model, tokenizer, tasks, batch_size=our_bs,
                                                       num_fewshot=args.num_fewshot)
                    report["ours_by_batch"][str(our_bs)] = round(seconds, 3)
                fastest = min(report["ours_by_batch"], key=report["ours_by_batch"].get)
                report["ours"] = {"evaluate_s": report["ours_by_batch"][fastest], "batch_size": int(fastest),
                                  "mfu": mfu(params, report["prompt_tokens"] or 0, report["ours_by_batch"][fastest], peak)}
            report["in_process"][bs]["vs_ours"] = compare(ours, scores)
            report["ours"].update(compare(ours, scores))  # against the last batch size, as before
        print(json.dumps({f"lm-eval scoring, batch {bs}": report["in_process"][bs]}), flush=True)
    if args.command:
        del model
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        with tempfile.TemporaryDirectory() as tmp:
            write_lmeval_tasks(tmp, tasks)
            report["command"] = {}
            for bs in args.batch_size:
                timed = time_lmeval_command(args.model, tmp, ["ref_all"], batch_size=bs, dtype=args.dtype,
                                            device=args.device, num_fewshot=args.num_fewshot or None)
                report["command"][bs] = {"seconds": round(timed["seconds"], 1), "acc": timed["acc"].get("ref_all"),
                                         "argv": " ".join(timed["argv"])}
                print(json.dumps({f"lm-eval command, batch {bs}": report["command"][bs]}), flush=True)
    print(json.dumps(report, indent=1))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
