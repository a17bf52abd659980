"""Run tasks on a model and compute lm-evaluation-harness's metrics.

Per task (lm-eval's ``multiple_choice`` output type):

* ``acc``: arg-max of the summed log-likelihoods equals the gold index;
* ``acc_norm`` (question format): arg-max of log-likelihood / length of the choice text in
  characters (lm-eval's ``completion_len``, without the target delimiter);
* ``correct_prob`` (question format, the notebook's metric): softmax over the choices' summed
  log-likelihoods, probability of the gold choice, averaged over questions;
* ``*_stderr``: sample standard deviation (n - 1) over sqrt(n), lm-eval's ``mean_stderr``
  (``None`` when n < 2);
* ``by_attribute``: the same metrics per question ``attribute``.

Groups (``Task.groups``) aggregate their leaf tasks as lm-eval does with ``weight_by_size: true``
(``mmlu``, ``mmlu_stem``, ``wmdp``): the metric is the mean over all questions of the group
(subtask means weighted by their sizes) and the stderr is lm-eval's ``pooled_sample_stderr``.

The letter format takes one forward pass per question when each of " A".." D" is one token
(``fast_letter``); the log-likelihoods equal the general path's.

``num_fewshot=k`` puts the first k examples of each task's few-shot pool (``Task.fewshot``; MMLU:
the subject's dev rows) between the description and the question, as lm-eval does; contexts longer
than the model are cut from the left in scoring (``scoring.loglikelihood_tokens``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from unlearning.core.errors import NonFiniteScoreError
from unlearning.model.layers import is_sharded
from unlearning.evaluation.parallel import data_parallel_map
from unlearning.evaluation.prompts import build_prompt
from unlearning.evaluation.scoring import (
    LogLikelihood,
    encode_pairs,
    loglikelihood_tokens,
    model_max_length,
    next_token_loglikelihoods,
)
from unlearning.evaluation.tasks import Task, check_fewshot_pool, get_tasks

log = logging.getLogger(__name__)

GROUP_AGGREGATION = "mean over questions (lm-eval weight_by_size: true), pooled stderr"


# ---------------------------------------------------------------------------------------------
# metrics


def mean_stderr(values: Sequence[float]) -> float | None:
    """lm-eval's ``mean_stderr``: sample std (ddof 1) / sqrt(n); ``None`` below two values."""
    n = len(values)
    if n < 2:
        return None
    mu = sum(values) / n
    return math.sqrt(sum((x - mu) ** 2 for x in values) / (n - 1)) / math.sqrt(n)


def pooled_stderr(stderrs: Sequence[float], sizes: Sequence[int]) -> float:
    """lm-eval's ``pooled_sample_stderr``: stderr of a size-weighted mean of subtask means."""
    pooled_var = sum((n - 1) * se ** 2 * n for se, n in zip(stderrs, sizes)) / (sum(sizes) - len(sizes))
    return math.sqrt(pooled_var / sum(sizes))


def softmax(x: Sequence[float]) -> np.ndarray:
    e = np.exp(np.asarray(x, dtype=np.float64) - np.max(x))
    return e / e.sum()


def score_question(lls: Sequence[float], choices: Sequence[str], gold: int, format: str) -> dict[str, float]:
    """Per-question metrics from the choices' summed log-likelihoods (lm-eval's process_results)."""
    lls_arr = np.asarray(lls, dtype=np.float64)
    pred = int(np.argmax(lls_arr))
    out = {"acc": float(pred == gold), "prediction": pred}
    if format == "cloze":
        lengths = np.array([float(len(c)) for c in choices])
        pred_norm = int(np.argmax(lls_arr / lengths))
        out.update(acc_norm=float(pred_norm == gold), prediction_norm=pred_norm,
                   correct_prob=float(softmax(lls_arr)[gold]))
    return out


def metric_names(format: str) -> tuple[str, ...]:
    return ("acc", "acc_norm", "correct_prob") if format == "cloze" else ("acc",)


def summarize(per_question: list[dict[str, float]], format: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for metric in metric_names(format):
        values = [q[metric] for q in per_question]
        out[metric] = sum(values) / len(values)
        out[f"{metric}_stderr"] = mean_stderr(values)
    out["n"] = len(per_question)
    return out


def aggregate_group(members: list[str], results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    formats = {results[m]["format"] for m in members}
    out: dict[str, Any] = {"format": formats.pop() if len(formats) == 1 else "mixed"}
    sizes = [results[m]["n"] for m in members]
    shared = [k for k in ("acc", "acc_norm", "correct_prob") if all(k in results[m] for m in members)]
    for metric in shared:
        out[metric] = sum(results[m][metric] * n for m, n in zip(members, sizes)) / sum(sizes)
        stderrs = [results[m][f"{metric}_stderr"] for m in members]
        out[f"{metric}_stderr"] = (pooled_stderr(stderrs, sizes)
                                   if None not in stderrs and sum(sizes) > len(sizes) else None)
    out.update(n=sum(sizes), subtasks=members, aggregation=GROUP_AGGREGATION)
    return out


# ---------------------------------------------------------------------------------------------
# evaluation


def _score_requests(model, tokenizer, prompts: list[tuple[Task, str, list[str]]], *, batch_size: int,
                    device, add_bos_token: bool | None, max_length: int, mixed_precision: bool | None,
                    fast_letter: bool) -> list[list[LogLikelihood]]:
    """Log-likelihoods of every continuation of every prompt, the letter fast path where it applies."""
    flat = encode_pairs(tokenizer, [(ctx, cont) for _, ctx, conts in prompts for cont in conts], add_bos_token)
    encoded, start = [], 0
    for _, _, conts in prompts:
        encoded.append(flat[start:start + len(conts)])
        start += len(conts)
    fast = [i for i, (task, _, _) in enumerate(prompts)
            if fast_letter and task.format == "letter" and all(len(c) == 1 for _, c in encoded[i])]
    fast_set = set(fast)
    general = [(i, j) for i in range(len(prompts)) if i not in fast_set for j in range(len(encoded[i]))]
    if prompts and len(fast) < sum(t.format == "letter" for t, _, _ in prompts):
        log.info("letter fast path off for %d questions (a letter continuation is not one token)",
                 sum(t.format == "letter" for t, _, _ in prompts) - len(fast))

    results: list[list[LogLikelihood]] = [[] for _ in prompts]
    common = dict(batch_size=batch_size, max_length=max_length, device=device, mixed_precision=mixed_precision)
    if fast:
        contexts = [encoded[i][0][0] for i in fast]  # the context's tokens are shared by its choices
        candidates = [[c[0] for _, c in encoded[i]] for i in fast]
        for i, lls in zip(fast, next_token_loglikelihoods(model, contexts, candidates, **common)):
            results[i] = lls
    if general:
        lls = loglikelihood_tokens(model, [encoded[i][j] for i, j in general], **common)
        for (i, _), ll in zip(general, lls):
            results[i].append(ll)
    return results


def evaluate(model, tokenizer, tasks: Sequence[Task] | Sequence[str] | str, *, batch_size: int = 32,
             device=None, log_samples: bool = False, limit: int | None = None,
             task_context: dict[str, Any] | None = None, add_bos_token: bool | None = None, max_length: int | None = None,
             mixed_precision: bool | None = None, fast_letter: bool = True,
             num_fewshot: int = 0) -> dict[str, dict[str, Any]]:
    """Evaluate ``model`` on ``tasks`` (Task objects or names); returns task -> metric -> value.

    ``limit`` keeps the first N questions of each task (lm-eval's ``--limit``). With
    ``log_samples`` each task also has ``"samples"``: one record per question. ``add_bos_token``
    ``None`` is lm-eval's default for the tokenizer; ``max_length`` ``None`` is the model's.
    Task names resolve through the registry with ``task_context`` (see ``get_tasks``).
    ``num_fewshot`` shows each question after the first k examples of its task's few-shot pool
    (tasks given as objects must have been loaded with ``num_fewshot``); each task's results then
    carry ``num_fewshot``.
    """
    if num_fewshot < 0:
        raise ValueError(f"num_fewshot: must be at least 0, got {num_fewshot}")
    if isinstance(tasks, str) or any(isinstance(t, str) for t in tasks):
        tasks = get_tasks(tasks, **{"num_fewshot": num_fewshot, **(task_context or {})})  # type: ignore[arg-type]
    tasks = list(tasks)
    for task in tasks:
        check_fewshot_pool(task, num_fewshot)
    if limit is not None and limit < 1:
        raise ValueError(f"limit: must be at least 1, got {limit}")
    limit_len = max_length or model_max_length(model, tokenizer)

    prompts: list[tuple[Task, str, list[str]]] = []
    owners: list[tuple[int, int]] = []  # (task index, question index) of each prompt
    for t, task in enumerate(tasks):
        questions = task.questions[:limit] if limit else task.questions
        examples = (task.fewshot or [])[:num_fewshot]  # lm-eval's first_n: the same k for every question
        for k, q in enumerate(questions):
            ctx, conts = build_prompt(task.format, q.question, q.choices, q.subject or task.subject,
                                      task.description, fewshot=examples)
            prompts.append((task, ctx, conts))
            owners.append((t, k))
    log.info("evaluating %d questions in %d tasks", len(prompts), len(tasks))
    # under torchrun each rank scores a shard of the prompts and all ranks get every result; a model
    # sharded by FSDP2 scores them all on every rank (evaluation/parallel.py says why)
    lls = data_parallel_map(lambda part: _score_requests(
        model, tokenizer, part, batch_size=batch_size, device=device, add_bos_token=add_bos_token,
        max_length=limit_len, mixed_precision=mixed_precision, fast_letter=fast_letter), prompts,
        replicate=is_sharded(model))

    per_task: list[list[tuple[Any, dict, list[LogLikelihood], str]]] = [[] for _ in tasks]
    for (t, k), (task, ctx, _), q_lls in zip(owners, prompts, lls):
        q = task.questions[k]
        if not all(math.isfinite(x) for x in q_lls):  # a NaN model must not score as a guess
            raise NonFiniteScoreError(f"task {task.name}, question {q.id!r}: log-likelihoods {list(map(float, q_lls))} "
                                      "are not finite; the model's weights or activations are broken")
        per_task[t].append((q, score_question(q_lls, q.choices, q.answer, task.format), q_lls, ctx))

    results: dict[str, dict[str, Any]] = {}
    for task, scored in zip(tasks, per_task):
        entry: dict[str, Any] = {"format": task.format, **summarize([s for _, s, _, _ in scored], task.format)}
        if num_fewshot:
            entry["num_fewshot"] = num_fewshot
        attributes = sorted({q.attribute for q, _, _, _ in scored if q.attribute is not None})
        entry["by_attribute"] = {
            attr: {k: v for k, v in summarize([s for q, s, _, _ in scored if q.attribute == attr],
                                              task.format).items() if not k.endswith("_stderr")}
            for attr in attributes}
        if log_samples:
            entry["samples"] = [_sample_record(task, q, s, q_lls, ctx) for q, s, q_lls, ctx in scored]
        results[task.name] = entry

    groups: dict[str, list[str]] = {}
    for task in tasks:
        for group in task.groups:
            groups.setdefault(group, []).append(task.name)
    for group, members in groups.items():
        if group in results:
            raise ValueError(f"group {group!r} has the name of a task")
        results[group] = aggregate_group(members, results)
    return results


def _sample_record(task: Task, q, scores: dict[str, float], lls: list[LogLikelihood], context: str) -> dict:
    record = {"task": task.name, "id": q.id, "prompt": context, "choices": list(q.choices),
              "loglikelihoods": [float(x) for x in lls], "is_greedy": [x.is_greedy for x in lls],
              "gold": q.answer, **scores}
    if q.attribute is not None:
        record["attribute"] = q.attribute
    return record
