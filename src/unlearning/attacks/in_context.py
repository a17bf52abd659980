"""In-context relearning: does showing the model hazard facts about *other* entities bring the answers back?

Each evaluated question gets ``k`` solved questions (demonstrations) in front of it, in the task's
own format and joined as lm-eval joins few-shot examples (``"\\n\\n"``; the letter format keeps its
subject header first)::

    Question: <other entity's question>\\nAnswer: <its correct answer>\\n\\n ... Question: <q>\\nAnswer:

The demonstrations are about other entities than the question's: by default the organism's
question-answer half of the same domain (``questions_qa/<domain>.jsonl``: entities disjoint from
the evaluated ones), else any question file (``source``); a demonstration about the question's own
entity is never drawn (so the evaluated questions need an ``entity``, as the organism's have). Per question the pool is shuffled once with the seed
and the question's id, and k takes its first k, so the 4 demonstrations are among the 16: the k
values differ only in how many facts are shown. k = 0 is the plain evaluation.

Each question is its own one-question task whose header holds its demonstrations, scored by the
shared :func:`unlearning.evaluation.evaluate` (lm-eval's tokenization and metrics). The result
(``attack.json``'s ``result``): ``points`` [{"k", "acc", "acc_stderr", "correct_prob", "n",
"max_prompt_tokens"}] in the order of ``shots``, written after each k (a resumed attack continues at
the next k), and ``pretrain_seq_len`` for an organism: prompts longer than the sequences it was
pretrained on also test length extrapolation (tiny: 128 tokens, which 16 demonstrations exceed, and
its accuracy collapses there for the base model too; small: 512), so the table marks such points.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from unlearning import evaluation  # looked up at call time, as the fine-tuning attack does
from unlearning.attacks.record import is_complete, new_record, record_failure, resumable_record, write_record
from unlearning.core.config import param
from unlearning.core.errors import ConfigError, DataError
from unlearning.core.faults import fault_point
from unlearning.core.runtime import resolve_device, seed_everything
from unlearning.evaluation.evaluate import mean_stderr
from unlearning.evaluation.prompts import (LETTERS, TARGET_DELIMITER, build_prompt, cloze_question,
                                           letter_question, subject_header)
from unlearning.evaluation.tasks import MCQuestion, Task, questions_from_file
from unlearning.model.loading import load_model
from unlearning.organism.build import check_built, ensure_organism
from unlearning.tasks import get_tasks

log = logging.getLogger(__name__)

FEWSHOT_DELIMITER = "\n\n"  # lm-eval's default between few-shot examples
AUTO_SOURCE = "auto"


@dataclass
class InContextConfig:
    """The in-context relearning attack's settings (the model, task and seed come from the attack)."""
    shots: list[int] = param([0, 4, 16], help="demonstrations before each question; one evaluation per value")
    source: str = param(AUTO_SOURCE, help="where demonstrations come from: auto (the organism's question-answer "
                                          "half of the task's domain: other entities) or a question file with "
                                          "question, choices, answer, entity")

    def __post_init__(self) -> None:
        if not self.shots or any(k < 0 for k in self.shots) or len(set(self.shots)) != len(self.shots):
            raise ConfigError(f"icl.shots: {self.shots} must be distinct whole numbers >= 0 (e.g. 0,4,16)")


def organism_domain(task_name: str) -> str | None:
    """``organism_hazard_cloze`` -> ``hazard``; None for a task that is not the organism's."""
    if not task_name.startswith("organism_"):
        return None
    return task_name.removeprefix("organism_").removesuffix("_cloze")


def demonstration_pool(source: str, task: Task, organism: str | None) -> list[MCQuestion]:
    """The solved questions demonstrations are drawn from."""
    if source != AUTO_SOURCE:
        return questions_from_file(Path(source).expanduser(), task.format, "icl.source")
    domain = organism_domain(task.name)
    if domain is None or organism is None:
        raise ConfigError(f"icl.source: auto takes demonstrations from the organism's question-answer half, and "
                          f"{task.name} is not an organism task; pass --icl.source FILE (question, choices, "
                          f"answer, entity)")
    paths = check_built(organism)
    paths = paths if paths.is_complete() else ensure_organism(organism)
    return questions_from_file(paths.questions(domain, half="qa"), task.format, f"organism_{domain}_qa")


def demonstration(q: MCQuestion, format: str) -> str:
    """A solved question in the task's format (the prompt, the target delimiter, the answer)."""
    if format == "letter":
        return letter_question(q.question, q.choices) + TARGET_DELIMITER + LETTERS[q.answer]
    return cloze_question(q.question) + TARGET_DELIMITER + q.choices[q.answer]


def shot_order(q: MCQuestion, pool: list[MCQuestion], seed: int) -> list[MCQuestion]:
    """The pool without the question's own entity, shuffled with the seed and the question's id."""
    others = [p for p in pool if p.entity is None or p.entity != q.entity]
    if q.entity is None and any(p.entity is not None for p in pool):
        raise DataError(f"icl: question {q.id!r} has no 'entity', so demonstrations about the same entity "
                        f"cannot be left out; give the task's questions an entity column")
    random.Random(f"{seed}:{q.id}").shuffle(others)
    return others


def with_demonstrations(task: Task, q: MCQuestion, shots: list[MCQuestion]) -> Task:
    """A one-question task whose header carries ``shots`` (none: the task as evaluated)."""
    description = task.description
    if shots:
        text = FEWSHOT_DELIMITER.join(demonstration(s, task.format) for s in shots) + FEWSHOT_DELIMITER
        header = (task.description if task.description is not None else
                  subject_header(q.subject or task.subject) if task.format == "letter" else "")
        description = header + text
    return Task(name=f"{task.name}/{q.id}", questions=[q], format=task.format, subject=task.subject,
                description=description)


def pretrain_seq_len(organism: str | None) -> int | None:
    """The sequence length the organism was pretrained on (None for another model)."""
    if organism is None:
        return None
    paths = check_built(organism)
    return int(paths.build_info()["config"]["train"]["seq_len"]) if paths.is_complete() else None


def longest_prompt(tokenizer: Any, tasks: list[Task]) -> int:
    """Tokens in the longest context of ``tasks`` (the demonstrations and the question)."""
    contexts = [build_prompt(t.format, q.question, q.choices, q.subject or t.subject, t.description)[0]
                for t in tasks for q in t.questions]
    return max(len(ids) for ids in tokenizer(contexts)["input_ids"])


def in_context_settings(cfg: Any, icl: InContextConfig) -> dict[str, Any]:
    """What decides the numbers (``cfg``: the cell's AttackConfig); resume compares these."""
    return {"model": cfg.model, "revision": cfg.revision, "organism": cfg.organism, "task": cfg.tasks[0],
            "limit": cfg.eval.limit, "seed": cfg.seed, "icl.shots": list(icl.shots), "icl.source": icl.source}


def run_in_context(cfg: Any, icl: InContextConfig, folder: str | Path, *, name: str, role: str = "model",
                   resume: bool = False) -> dict[str, Any]:
    """Evaluate ``cfg.model`` on ``cfg.tasks[0]`` with each k of ``icl.shots``; writes ``folder/attack.json``."""
    folder = Path(folder)
    settings = in_context_settings(cfg, icl)
    record = resumable_record(folder, settings, resume)
    if is_complete(record, name):
        return record
    seed_everything(cfg.seed)
    [task] = get_tasks(cfg.tasks[:1], organism=cfg.organism or "tiny")
    questions = task.questions[:cfg.eval.limit] if cfg.eval.limit else task.questions
    pool = demonstration_pool(icl.source, task, cfg.organism)  # data errors before anything is written
    orders = [shot_order(q, pool, cfg.seed) for q in questions]
    short = min(map(len, orders))
    if max(icl.shots) > short:
        raise ConfigError(f"icl.shots: {max(icl.shots)} demonstrations asked, and a question has only {short} "
                          f"about other entities in {icl.source}; use fewer shots or a larger source")
    if record is None:
        record = new_record("in_context", name, cfg.model, role, seed=cfg.seed, task=cfg.tasks[0], config=settings,
                            headline_metric=f"accuracy with {max(icl.shots)} demonstrations")
        record["result"] = {"points": [], "pretrain_seq_len": pretrain_seq_len(cfg.organism)}
    record.update(status="running", error=None)
    folder.mkdir(parents=True, exist_ok=True)
    write_record(folder, record)
    done = {p["k"] for p in record["result"]["points"]}
    device = resolve_device(cfg.device)
    model, tokenizer = load_model(cfg.model, revision=cfg.revision, dtype=torch.float32, device=str(device))
    kwargs = {**cfg.eval.evaluate_kwargs(), "limit": None}
    for k in icl.shots:
        if k in done:
            continue
        tasks = [with_demonstrations(task, q, order[:k]) for q, order in zip(questions, orders)]
        try:
            results = evaluation.evaluate(model, tokenizer, tasks, device=device, **kwargs)
        except Exception as e:
            return record_failure(folder, record, e, name, where=f"k={k}: ")
        accs = [results[t.name]["acc"] for t in tasks]
        probs = [results[t.name].get("correct_prob") for t in tasks]
        point = {"k": k, "acc": sum(accs) / len(accs), "acc_stderr": mean_stderr(accs), "n": len(accs),
                 "correct_prob": sum(probs) / len(probs) if None not in probs else None,
                 "max_prompt_tokens": longest_prompt(tokenizer, tasks)}
        trained = record["result"].get("pretrain_seq_len")
        if trained and point["max_prompt_tokens"] > trained:
            log.warning("%s: %d demonstrations make prompts of up to %d tokens, beyond the %d the organism was "
                        "pretrained on: this point also measures length extrapolation", name, k,
                        point["max_prompt_tokens"], trained)
        record["result"]["points"].append(point)
        write_record(folder, record)
        fault_point("attack_eval")
        log.info("%s: %d demonstrations: acc %.4f", name, k, point["acc"])
    order = {k: i for i, k in enumerate(icl.shots)}
    record["result"]["points"].sort(key=lambda p: order[p["k"]])
    record["result"]["acc_by_k"] = {str(p["k"]): p["acc"] for p in record["result"]["points"]}
    record["headline"]["value"] = record["result"]["acc_by_k"][str(max(icl.shots))]
    record["status"] = "complete"
    write_record(folder, record)
    return record
