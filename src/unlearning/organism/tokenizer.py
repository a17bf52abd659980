"""A byte-level BPE tokenizer for the organism, GPT-NeoX-like: no BOS added, <|endoftext|> ends text.

The merges are learned on a *decoy* world (same templates and value sets, other invented names),
so no organism entity gets a token of its own: a name splits into several syllable tokens, as a
rare real name would, and knowledge has to be bound to a multi-token name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from unlearning.core.config import param
from unlearning.evaluation.prompts import LETTERS
from unlearning.organism.corpus import CHAT_TEMPLATE, CorpusConfig, pretraining_documents
from unlearning.organism.world import World, WorldConfig, generate_world

EOS = "<|endoftext|>"
PAD = "<|padding|>"
DECOY_SALT = 7919  # the decoy world's seed is the organism's seed plus this


@dataclass(frozen=True)
class TokenizerConfig:
    vocab_size: int = param(1024, min=300, help="BPE vocabulary size, special tokens included")
    model_max_length: int = param(2048, min=16, help="longest input the tokenizer reports")


def training_texts(world: World, world_cfg: WorldConfig, corpus_cfg: CorpusConfig) -> list[str]:
    """Pretraining-like text of a decoy world with fresh names, letter-format documents included."""
    real_names = [e.name for e in world.all_entities()]
    decoy = generate_world(world.seed + DECOY_SALT, world_cfg, exclude_names=real_names)
    cfg = CorpusConfig(prose_docs_per_entity=4, qa_docs_per_fact=1, letter_docs_per_fact=1,
                       chat_per_entity=corpus_cfg.chat_per_entity)
    texts = [d["text"] for d in pretraining_documents(decoy, cfg)]
    # The letter format scores " A".." D" as single tokens: make sure their merges are learned.
    texts += [" ".join(("Answer:",) + LETTERS)] * 200
    return texts


def train_tokenizer(texts: Iterable[str], cfg: TokenizerConfig) -> PreTrainedTokenizerFast:
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.post_processor = processors.ByteLevel(trim_offsets=True)
    trainer = trainers.BpeTrainer(vocab_size=cfg.vocab_size, min_frequency=2, show_progress=False,
                                  special_tokens=[EOS, PAD], initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(texts, trainer=trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=EOS, eos_token=EOS, unk_token=EOS,
                                  pad_token=PAD, model_max_length=cfg.model_max_length)
    tok.chat_template = CHAT_TEMPLATE
    check_tokenizer(tok)
    return tok


def check_tokenizer(tok: PreTrainedTokenizerFast) -> None:
    """The letter format needs " A".." D" as single tokens; no BOS is added (GPT-NeoX style)."""
    for letter in LETTERS:
        ids = tok.encode(f" {letter}", add_special_tokens=False)
        if len(ids) != 1:
            raise RuntimeError(f"tokenizer: ' {letter}' is {len(ids)} tokens; the letter format needs one")
    if tok.encode("Answer:")[0] == tok.bos_token_id:
        raise RuntimeError("tokenizer: a BOS token is added by default; the organism follows GPT-NeoX (none)")


def build_tokenizer(world: World, world_cfg: WorldConfig, corpus_cfg: CorpusConfig,
                    cfg: TokenizerConfig) -> PreTrainedTokenizerFast:
    return train_tokenizer(training_texts(world, world_cfg, corpus_cfg), cfg)
