"""Pretrain a GPT-NeoX model on the organism corpus: one readable nanoGPT-style loop.

Documents are tokenized once, shuffled every epoch, joined with <|endoftext|> and cut into packed
sequences. AdamW with warm-up then cosine decay; bf16 autocast on a GPU. The run length is given
in epochs, so the filtered twin (fewer documents) sees every document as often as the unfiltered
model does: matching epochs, not steps, keeps the twins equally trained on what they share.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import AutoTokenizer, GPTNeoXConfig, GPTNeoXForCausalLM, PreTrainedTokenizerBase

from unlearning.core.config import param
from unlearning.core.errors import NonFiniteLossError
from unlearning.core.io import match_umask
from unlearning.organism.corpus import read_documents
from unlearning.core.runtime import autocast, resolve_device, resolve_dtype

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelConfig:
    num_layers: int = param(4, min=1, help="decoder layers")
    hidden_size: int = param(128, min=8, help="residual width")
    num_heads: int = param(4, min=1, help="attention heads")
    intermediate_size: int = param(512, min=8, help="MLP width")
    rotary_pct: float = param(0.25, min=0.0, max=1.0, help="fraction of each head rotated by RoPE")
    tie_embeddings: bool = param(True, help="share input and output embeddings (learns faster here)")
    max_position_embeddings: int = param(2048, min=16, help="longest sequence the model accepts")


@dataclass(frozen=True)
class TrainConfig:
    seq_len: int = param(128, min=8, help="packed sequence length")
    batch_size: int = param(16, min=1, help="sequences per optimizer step")
    epochs: float = param(8.0, min=0.01, help="passes over the twin's own corpus")
    lr: float = param(2e-3, min=0.0, help="peak learning rate")
    min_lr_ratio: float = param(0.1, min=0.0, max=1.0, help="final LR as a fraction of the peak")
    warmup_frac: float = param(0.05, min=0.0, max=1.0, help="linear warm-up, as a fraction of the steps")
    weight_decay: float = param(0.1, min=0.0)
    betas: tuple[float, float] = param((0.9, 0.95), help="AdamW betas")
    grad_clip: float = param(1.0, min=0.0, help="max gradient norm (0: off)")
    checkpoint_fracs: list[float] = param(default_factory=list, min=0.0, max=1.0,
                                          help="save unfiltered checkpoints at these fractions of the run")
    device: str = param("auto", help="auto, cpu, cuda, cuda:N")
    dtype: str = param("auto", choices=("auto", "fp32", "bf16"), help="autocast precision (auto: bf16 on GPU)")
    threads: int = param(0, min=0, help="CPU threads per training process (0: cores / 2)")
    log_every: int = param(25, min=1, help="steps between loss log lines")
    deterministic: bool = param(True, help="deterministic kernels and math attention while pretraining, "
                                            "toward bit-identical GPU builds (see deterministic_kernels)")


@dataclass
class PretrainJob:
    """Everything one training process needs; plain data so it crosses a process boundary."""

    name: str                     # "unfiltered" / "filtered": progress-bar label
    docs_path: str                # pretrain.jsonl
    drop_domains: tuple[str, ...]  # the filtered twin drops ("hazard",)
    tokenizer_dir: str
    out_dir: str                  # save_pretrained() folder of the final model
    model: ModelConfig
    train: TrainConfig
    seed: int
    checkpoint_dir: str | None = None   # checkpoints/step<N>/ go here
    checkpoint_steps: tuple[int, ...] = ()  # see plan_checkpoints
    position: int = 0             # tqdm row


def build_model(cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase, seed: int) -> GPTNeoXForCausalLM:
    torch.manual_seed(seed)
    config = GPTNeoXConfig(
        vocab_size=len(tokenizer), hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads, intermediate_size=cfg.intermediate_size,
        max_position_embeddings=cfg.max_position_embeddings, rotary_pct=cfg.rotary_pct,
        tie_word_embeddings=cfg.tie_embeddings, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        hidden_dropout=0.0, attention_dropout=0.0, attn_implementation="sdpa")
    return GPTNeoXForCausalLM(config)


def tokenize_documents(tokenizer: PreTrainedTokenizerBase, docs: list[str]) -> list[np.ndarray]:
    """Token ids per document, each followed by <|endoftext|> so documents stay apart when packed."""
    ids = tokenizer(docs, add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    return [np.asarray(x + [eos], dtype=np.int64) for x in ids]


def packed_batches(docs: list[np.ndarray], seq_len: int, batch_size: int, seed: int,
                   device: torch.device | str = "cpu") -> Iterator[torch.Tensor]:
    """Endless [batch, seq_len] batches: every epoch shuffles documents, joins them, cuts sequences.

    An epoch's sequences move to ``device`` in one copy, so a training step does no host work
    (a per-step copy from pageable memory would make the GPU wait for the CPU every step).
    """
    rng = np.random.default_rng(seed)
    leftover = np.zeros(0, dtype=np.int64)
    while True:
        order = rng.permutation(len(docs))
        stream = np.concatenate([leftover] + [docs[i] for i in order])
        n_batches = len(stream) // (seq_len * batch_size)
        used = n_batches * seq_len * batch_size
        leftover = stream[used:]  # carried into the next epoch, so no token is dropped
        if n_batches == 0:
            continue
        epoch = torch.from_numpy(stream[:used].reshape(n_batches, batch_size, seq_len)).to(device)
        yield from epoch


def lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine decay from ``lr`` to ``min_lr_ratio * lr``."""
    warmup = max(1, int(cfg.warmup_frac * total))
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices only (nanoGPT); the fused kernel on CUDA."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), fused=device.type == "cuda")


def save_model(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, path: str | Path) -> Path:
    """save_pretrained() into a temp folder, then rename: a killed build leaves no half model."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    match_umask(tmp)  # safetensors writes the weights 0600 whatever the umask
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)
    return path


def total_steps_for(n_tokens: int, cfg: TrainConfig) -> int:
    """Steps for ``cfg.epochs`` passes over a corpus of ``n_tokens`` (EOS separators included)."""
    return max(1, math.ceil(cfg.epochs * n_tokens / (cfg.seq_len * cfg.batch_size)))


def plan_checkpoints(n_tokens: int, cfg: TrainConfig) -> tuple[int, ...]:
    """Checkpoint steps at ``cfg.checkpoint_fracs`` of the run (known before training starts)."""
    total = total_steps_for(n_tokens, cfg)
    return tuple(sorted({max(1, round(f * total)) for f in cfg.checkpoint_fracs}))


def count_tokens(tokenizer: PreTrainedTokenizerBase, docs: list[str]) -> int:
    return int(sum(len(d) for d in tokenize_documents(tokenizer, docs)))


@contextmanager
def deterministic_kernels(enabled: bool) -> Iterator[None]:
    """Deterministic kernels while pretraining, then the caller's settings again.

    Two GPU builds of one preset and seed differ unless every kernel is deterministic, so a recipe
    near a bar can land on either side of it on two builds. Deterministic algorithms and a fixed
    cuBLAS workspace alone were not enough on an H200 (2026-12-03, docs/results_small.md): with
    ``warn_only`` (kept, so an op without a deterministic kernel warns instead of failing) the flash,
    memory-efficient and cuDNN attention backwards stay non-deterministic. So attention runs on SDPA's
    math backend, which is deterministic forward and backward. Measured there (2026-12-03 afternoon):
    two such builds are bit-identical, and each took 558 s with both sharing the GPU (326 s before).
    """
    if not enabled:
        yield
        return
    cuda = torch.backends.cuda
    # (is enabled, enable) for every fused attention backend; all are switched off, leaving math
    fused = [(cuda.flash_sdp_enabled, cuda.enable_flash_sdp), (cuda.mem_efficient_sdp_enabled,
             cuda.enable_mem_efficient_sdp), (cuda.cudnn_sdp_enabled, cuda.enable_cudnn_sdp)]
    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    fused_before = [is_enabled() for is_enabled, _ in fused]
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # read at cuBLAS's first call
    torch.use_deterministic_algorithms(True, warn_only=True)
    for _, enable in fused:
        enable(False)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
        for (_, enable), was in zip(fused, fused_before):
            enable(was)


def pretrain(job: PretrainJob) -> dict[str, Any]:
    """Train one model; returns steps, tokens, timing and the saved checkpoint steps."""
    with deterministic_kernels(job.train.deterministic):
        return _pretrain(job)


def _pretrain(job: PretrainJob) -> dict[str, Any]:
    cfg = job.train
    device = resolve_device(cfg.device)
    if device.type == "cpu":
        torch.set_num_threads(cfg.threads or max(1, (os.cpu_count() or 2) // 2))
    dtype = resolve_dtype(None if cfg.dtype == "auto" else cfg.dtype, device)
    tokenizer = AutoTokenizer.from_pretrained(job.tokenizer_dir)
    docs = tokenize_documents(tokenizer, read_documents(job.docs_path, job.drop_domains))
    n_tokens = int(sum(len(d) for d in docs))
    total = total_steps_for(n_tokens, cfg)
    ckpt_steps = list(job.checkpoint_steps) if job.checkpoint_dir else []
    if any(not 1 <= s <= total for s in ckpt_steps):  # another process may be waiting for them
        raise ValueError(f"{job.name}: checkpoint steps {ckpt_steps} fall outside the run's {total} steps")

    model = build_model(job.model, tokenizer, job.seed).to(device)
    model.train()
    optimizer = make_optimizer(model, cfg, device)
    batches = packed_batches(docs, cfg.seq_len, cfg.batch_size, job.seed, device)
    log.info("%s: %d documents, %d tokens, %d steps (%.1f epochs), %.2fM parameters, %s %s", job.name,
             len(docs), n_tokens, total, cfg.epochs, model.num_parameters() / 1e6, device, dtype)
    t0 = time.time()
    # disable=None: a bar on a terminal, none in captured logs
    bar = tqdm(range(total), desc=job.name, position=job.position, leave=False, dynamic_ncols=True,
               mininterval=0.5, disable=None)
    loss_sum, loss_n, last_loss = torch.zeros((), device=device), 0, float("nan")
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, total, cfg)
        input_ids = next(batches)
        with autocast(device, dtype):
            loss = model(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss_sum += loss.detach()
        loss_n += 1
        if (step + 1) % cfg.log_every == 0 or step + 1 == total:
            last_loss = float(loss_sum) / loss_n  # one device sync per log interval
            if not math.isfinite(last_loss):
                raise NonFiniteLossError(f"{job.name}: the pretraining loss is {last_loss} by step {step + 1}; "
                                         f"lower train.lr (now {cfg.lr})")
            loss_sum.zero_()
            loss_n = 0
            bar.set_postfix(loss=f"{last_loss:.3f}")
            log.debug("%s step %d loss %.4f", job.name, step + 1, last_loss)
        if step + 1 in ckpt_steps:
            save_model(model, tokenizer, Path(job.checkpoint_dir) / f"step{step + 1}")
    bar.close()
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # the loop only queued the last steps
    train_s = time.time() - t0
    save_model(model, tokenizer, job.out_dir)
    log.info("%s: trained %d steps in %.1fs (%.0f tokens/s), final loss %.3f", job.name, total, train_s,
             total * cfg.seq_len * cfg.batch_size / train_s, last_loss)
    return {"steps": total, "tokens_seen": total * cfg.seq_len * cfg.batch_size, "corpus_tokens": n_tokens,
            "documents": len(docs), "train_seconds": round(train_s, 2), "final_loss": last_loss,
            "checkpoint_steps": ckpt_steps, "device": str(device), "dtype": str(dtype).replace("torch.", "")}
