"""Tiny evaluation set-up the evaluation tests share: a byte-level BPE tokenizer, a random GPT-NeoX,
random questions and question files."""

from __future__ import annotations

import json
import random

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from unlearning.evaluation import MCQuestion

torch.set_num_threads(1)

WORDS = ["the", "virus", "host", "binds", "receptor", "cell", "line", "of", "what", "is", "which", "bat"]
CHOICES = ["alpha", "beta gamma", "delta", "epsilon zeta eta"]


def make_tokenizer(vocab_size: int = 320, bos_template: bool = False):
    """A byte-level BPE like GPT-NeoX's; ``vocab_size=257`` leaves no merges (" A" is two tokens)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = [" ".join(WORDS), "Question: what is it?\nAnswer:"] * 50 + [" A", " B", " C", " D"] * 200
    tok.train_from_iterator(corpus, trainer)
    if bos_template:  # a Llama-like tokenizer that adds BOS by itself
        tok.post_processor = processors.TemplateProcessing(single="<|endoftext|> $A",
                                                           special_tokens=[("<|endoftext|>", 0)])
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>",
                                                eos_token="<|endoftext|>")


def make_model(vocab_size: int, max_positions: int = 512, seed: int = 0):
    config = transformers.GPTNeoXConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2,
                                        num_attention_heads=4, intermediate_size=64,
                                        max_position_embeddings=max_positions, initializer_range=0.3)
    torch.manual_seed(seed)
    return transformers.GPTNeoXForCausalLM(config).eval()


def random_question(rng: random.Random, i: int, attribute: str | None = None) -> MCQuestion:
    text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 25))) + "?"
    return MCQuestion(id=f"q{i}", question=text, choices=list(CHOICES), answer=rng.randrange(4),
                      attribute=attribute)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def good_rows(n=3):
    return [{"id": f"r{i}", "question": f"What is {i}?", "choices": ["a", "b", "c", "d"], "answer": i % 4,
             "attribute": "num"} for i in range(n)]
