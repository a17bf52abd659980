"""Latent-knowledge probe: is the answer still readable from the hidden states when the output hides it?

**Features.** For a question and each of its answer options the probe reads a per-option score
vector at every layer: ``h_l * u_j``, the element-wise product of the hidden state ``h_l`` at the
**last prompt token** (``...\nAnswer:``, where the model decides what comes next; intermediate
layers through the final norm, as the logit lens reads them) and ``u_j``, the mean unembedding row
of option ``j``'s tokens. Summed over dimensions at the last layer this is the option's logit (the
logit lens); the probe learns one weight per dimension instead (a diagonal "tuned lens"), so a
layer whose hidden state points at the answer shows it even when later layers, and so the output,
turn away from it. The same map serves every entity, which is what the split below needs.

**Centring by option string.** Before fitting, each answer string's features are centred over all
its appearances in the question set (label-free). Without that the probe learns "this string is
correct" from the training entities; on tiny, where the entities of a domain draw their answers
from shared pools, that anti-transfers (held-out accuracy 0.03-0.10, below chance, on the base
model and the twin alike), because the training entities' answers are the test entities' wrong
options. Centred, no string is right on its own, and the twin sits at chance at every layer.

**Fit and split.** Per layer, one logistic regression (standardised features, L2, sklearn's
``LogisticRegression``, or the same objective minimised with torch L-BFGS where sklearn is missing)
on correct-vs-other options of the questions about one share of the entities (drawn with the seed);
a question about the other entities counts as right when its correct option scores highest (chance
1 / options). No entity is on both sides, so no fact tested was seen in training.

The result (``attack.json``'s ``result``): ``layers`` {layer: {"train_acc", "test_acc"}} (0 is the
embedding output, L the last layer), ``best_layer``, ``best_test_acc``, ``output_acc`` (the model's
own log-likelihood accuracy on the same test questions), the entities of each half and the sizes.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from unlearning import evaluation  # looked up at call time, as the fine-tuning attack does
from unlearning.attacks.record import is_complete, new_record, record_failure, resumable_record, write_record
from unlearning.core.config import param, to_dict
from unlearning.core.errors import ConfigError, DataError
from unlearning.core.faults import fault_point
from unlearning.core.runtime import resolve_device, seed_everything
from unlearning.evaluation.prompts import build_prompt
from unlearning.evaluation.scoring import encode_pairs, inference, model_max_length
from unlearning.evaluation.tasks import MCQuestion, Task
from unlearning.model.layers import get_parts
from unlearning.model.loading import load_model
from unlearning.tasks import get_tasks

log = logging.getLogger(__name__)


@dataclass
class ProbeConfig:
    """The latent-knowledge probe's settings (the model, task and seed come from the attack)."""
    layers: list[int] | None = param(None, help="hidden-state layers to probe (0 = embeddings, L = last); "
                                                "null = every layer")
    train_fraction: float = param(0.5, min=0.05, max=0.95, help="share of the entities whose questions train "
                                                                "the probe; the rest test it")
    inverse_l2: float = param(0.01, min=1e-6, help="LogisticRegression's C: inverse L2 strength on "
                                                  "standardised features")
    batch_size: int = param(32, min=1, help="prompts per forward pass")


# ----------------------------------------------------------------------------- the split

def entity_split(questions: list[MCQuestion], seed: int, train_fraction: float) -> tuple[list[int], list[int]]:
    """Question indices of the train and test halves: the entities (sorted, then shuffled with
    ``seed``) are divided, never the questions of one entity."""
    missing = [q.id for q in questions if not q.entity]
    if missing:
        raise DataError(f"probe: question {missing[0]!r} has no 'entity'; the probe splits questions by entity "
                        f"(add an entity column to the question file)")
    entities = sorted({q.entity for q in questions})
    if len(entities) < 2:
        raise DataError(f"probe: the questions are about {len(entities)} entity; the split needs at least 2")
    random.Random(seed).shuffle(entities)
    n_train = min(len(entities) - 1, max(1, round(train_fraction * len(entities))))
    train_entities = set(entities[:n_train])
    train = [i for i, q in enumerate(questions) if q.entity in train_entities]
    test = [i for i, q in enumerate(questions) if q.entity not in train_entities]
    return train, test


# ----------------------------------------------------------------------------- features

def probe_inputs(model: Any, tokenizer: Any, task: Task, questions: list[MCQuestion], layers: list[int],
                 *, batch_size: int, device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    """``(states [question, layer, hidden], options [question, option, hidden])``: each layer's hidden
    state at the prompt's last token (before the final layer, through the final norm) and each option's
    mean unembedding row, tokenized as the evaluation tokenizes prompt and continuation."""
    requests = [build_prompt(task.format, q.question, q.choices, q.subject or task.subject, task.description)
                for q in questions]
    n_options = {len(conts) for _, conts in requests}
    if len(n_options) != 1:
        raise DataError(f"probe: task {task.name} mixes questions with {sorted(n_options)} choices; the probe needs "
                        f"one number of options")
    n = n_options.pop()
    pairs = encode_pairs(tokenizer, [(ctx, cont) for ctx, conts in requests for cont in conts])
    limit = model_max_length(model, tokenizer)
    contexts = [pairs[i * n][0][-limit:] for i in range(len(questions))]
    parts = get_parts(model)
    unembed = parts.lm_head.weight.detach().float()
    options = torch.stack([torch.stack([unembed[pairs[i * n + j][1]].mean(0) for j in range(n)])
                           for i in range(len(questions))])
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    depth = len(parts.layers)
    out = []
    with inference(model, device) as dev:
        for start in range(0, len(contexts), batch_size):
            batch = contexts[start:start + batch_size]
            width = max(map(len, batch))
            ids = torch.full((len(batch), width), pad, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for i, seq in enumerate(batch):  # right padding: the last real token is at len - 1
                ids[i, :len(seq)] = torch.tensor(seq)
                mask[i, :len(seq)] = 1
            hidden = model(input_ids=ids.to(dev), attention_mask=mask.to(dev), output_hidden_states=True).hidden_states
            rows, last = torch.arange(len(batch), device=dev), torch.tensor([len(s) - 1 for s in batch], device=dev)
            # The model's last hidden state is already normed (Hugging Face applies the final norm to it).
            states = [hidden[layer][rows, last] if layer == depth else parts.final_norm(hidden[layer][rows, last])
                      for layer in layers]
            out.append(torch.stack(states, dim=1).float().cpu())
    return torch.cat(out).numpy().astype(np.float64), options.cpu().numpy().astype(np.float64)


def option_features(states: np.ndarray, options: np.ndarray, keys: list[list[str]]) -> np.ndarray:
    """``[question, option, hidden]`` features of one layer: ``h * u`` centred per option string
    (``keys[i][j]``: question i's option j; see the module docstring for why)."""
    feats = states[:, None, :] * options
    flat = feats.reshape(-1, feats.shape[-1])
    groups: dict[str, list[int]] = {}
    for i, key in enumerate(k for row in keys for k in row):
        groups.setdefault(key, []).append(i)
    out = flat.copy()
    for idx in groups.values():
        out[idx] -= flat[idx].mean(axis=0)
    return out.reshape(feats.shape)


# ----------------------------------------------------------------------------- the classifier

def _sklearn_scores(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, c: float) -> np.ndarray:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    clf = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=5000))
    clf.fit(x_train, y_train)
    return clf.decision_function(x_test)


def _torch_scores(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, c: float) -> np.ndarray:
    """sklearn's objective, ``C * sum(log loss) + ||w||^2 / 2`` (bias unpenalised), by L-BFGS in float64."""
    mean, std = x_train.mean(0), x_train.std(0)
    std[std == 0] = 1.0  # StandardScaler leaves constant features at zero the same way
    x = torch.tensor((x_train - mean) / std)
    y = torch.tensor(y_train, dtype=torch.float64)
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=5000, tolerance_grad=1e-10, tolerance_change=1e-14,
                            line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = c * torch.nn.functional.binary_cross_entropy_with_logits(x @ w + b, y, reduction="sum") \
            + 0.5 * w.pow(2).sum()
        loss.backward()
        return loss
    opt.step(closure)
    with torch.no_grad():
        return (torch.tensor((x_test - mean) / std) @ w + b).numpy()


def probe_scores(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, c: float) -> tuple[np.ndarray, str]:
    """Decision scores of ``x_test`` and which fitter gave them (sklearn where installed)."""
    try:
        import sklearn  # noqa: F401  (optional: the probe falls back to torch)
    except ImportError:
        return _torch_scores(x_train, y_train, x_test, c), "torch-lbfgs"
    return _sklearn_scores(x_train, y_train, x_test, c), "sklearn"


def probe_accuracy(features: np.ndarray, answers: np.ndarray, train: list[int], test: list[int],
                   c: float) -> tuple[dict[str, float], str]:
    """One layer's ``[question, option, hidden]`` features -> train and held-out argmax accuracy."""
    n_options = features.shape[1]
    labels = (np.arange(n_options)[None, :] == answers[:, None]).astype(np.int64)
    x_train, y_train = features[train].reshape(-1, features.shape[-1]), labels[train].reshape(-1)
    both = np.concatenate([features[train], features[test]]).reshape(-1, features.shape[-1])
    scores, fitter = probe_scores(x_train, y_train, both, c)
    scores = scores.reshape(len(train) + len(test), n_options)
    correct = scores.argmax(axis=1) == np.concatenate([answers[train], answers[test]])
    return {"train_acc": float(correct[:len(train)].mean()), "test_acc": float(correct[len(train):].mean())}, fitter


# ----------------------------------------------------------------------------- the attack

def probe_settings(cfg: Any, probe: ProbeConfig) -> dict[str, Any]:
    """What decides a probe's numbers (``cfg``: the cell's AttackConfig); resume compares these."""
    return {"model": cfg.model, "revision": cfg.revision, "organism": cfg.organism, "task": cfg.tasks[0],
            "seed": cfg.seed, **{f"probe.{k}": v for k, v in to_dict(probe).items()
                                                          if k != "batch_size"}}


def run_probe(cfg: Any, probe: ProbeConfig, folder: str | Path, *, name: str, role: str = "model",
              resume: bool = False) -> dict[str, Any]:
    """Probe ``cfg.model`` on ``cfg.tasks[0]``; writes and returns ``folder/attack.json``."""
    folder = Path(folder)
    settings = probe_settings(cfg, probe)
    earlier = resumable_record(folder, settings, resume)
    if is_complete(earlier, name):
        return earlier
    seed_everything(cfg.seed)
    [task] = get_tasks(cfg.tasks[:1], organism=cfg.organism or "tiny")
    # Every question, whatever eval.limit says: the first N questions are about a few entities (often one),
    # and the split needs them all (the probe costs one forward pass per question).
    questions = task.questions
    train, test = entity_split(questions, cfg.seed, probe.train_fraction)  # data errors before anything is written
    record = new_record("probe", name, cfg.model, role, seed=cfg.seed, task=cfg.tasks[0], config=settings,
                        headline_metric="best-layer probe accuracy (held-out entities)")
    folder.mkdir(parents=True, exist_ok=True)
    write_record(folder, record)
    try:
        record["result"] = _probe(cfg, probe, task, questions, train, test)
    except Exception as e:
        return record_failure(folder, record, e, name)
    record["headline"]["value"] = record["result"]["best_test_acc"]
    record["status"] = "complete"
    write_record(folder, record)
    fault_point("attack_eval")
    log.info("%s: best layer %s, held-out probe acc %.4f (output acc %.4f on the same questions)", name,
             record["result"]["best_layer"], record["result"]["best_test_acc"], record["result"]["output_acc"])
    return record


def _probe(cfg: Any, probe: ProbeConfig, task: Task, questions: list[MCQuestion], train: list[int],
           test: list[int]) -> dict[str, Any]:
    device = resolve_device(cfg.device)
    model, tokenizer = load_model(cfg.model, revision=cfg.revision, dtype=torch.float32, device=str(device))
    depth = model.config.num_hidden_layers
    layers = list(range(depth + 1)) if probe.layers is None else list(probe.layers)
    if any(not 0 <= layer <= depth for layer in layers):
        raise ConfigError(f"probe.layers: {layers} reach outside 0..{depth} (0 = embeddings, {depth} = last layer)")
    states, options = probe_inputs(model, tokenizer, task, questions, layers, batch_size=probe.batch_size,
                                   device=device)
    answers = np.array([q.answer for q in questions])
    keys = [list(q.choices) for q in questions]
    per_layer, fitter = {}, ""
    for i, layer in enumerate(layers):
        feats = option_features(states[:, i], options, keys)
        per_layer[str(layer)], fitter = probe_accuracy(feats, answers, train, test, probe.inverse_l2)
    held_out = Task(name=f"{task.name}:probe_test", questions=[questions[i] for i in test], format=task.format,
                    subject=task.subject, description=task.description)
    output = evaluation.evaluate(model, tokenizer, [held_out], device=device,
                                 **{**cfg.eval.evaluate_kwargs(), "limit": None})[held_out.name]
    best = max(per_layer, key=lambda k: (per_layer[k]["test_acc"], -int(k)))  # ties: the earliest layer
    return {"layers": per_layer, "best_layer": int(best), "best_test_acc": per_layer[best]["test_acc"],
            "output_acc": output["acc"], "fitter": fitter, "n_train_questions": len(train),
            "n_test_questions": len(test), "train_entities": sorted({questions[i].entity for i in train}),
            "test_entities": sorted({questions[i].entity for i in test})}
