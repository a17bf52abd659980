"""Tiny random-weight causal LMs of every supported family, for tests (CPU, milliseconds each)."""

from __future__ import annotations

import torch
import transformers

VOCAB = 61
FAMILIES = ("gpt_neox", "llama", "mistral", "qwen2", "gpt2")


def tiny_config(family: str, layers: int = 3, hidden: int = 32) -> transformers.PretrainedConfig:
    common = dict(vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if family == "gpt2":
        # dropout off so train-mode forwards are deterministic
        return transformers.GPT2Config(n_embd=hidden, n_layer=layers, n_head=4, n_positions=64, resid_pdrop=0.0,
                                       embd_pdrop=0.0, attn_pdrop=0.0, **common)
    if family == "gpt_neox":
        return transformers.GPTNeoXConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                                          intermediate_size=2 * hidden, max_position_embeddings=64, **common)
    cls = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig,
           "qwen2": transformers.Qwen2Config}[family]
    return cls(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
               intermediate_size=2 * hidden, max_position_embeddings=64, **common)


def tiny_model(family: str, layers: int = 3, hidden: int = 32, seed: int = 0) -> transformers.PreTrainedModel:
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(tiny_config(family, layers, hidden)).eval()


def tiny_batch(batch: int = 2, seq: int = 7, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, seq), generator=g)
    mask = torch.ones_like(ids)
    mask[0, -2:] = 0  # right padding on one row
    return ids, mask


def tiny_tokenizer(with_pad: bool = False):
    """A word-level tokenizer over VOCAB tokens ("<unk>", "<s>", "</s>", "w3" ... ), no pad unless asked."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, VOCAB)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    extra = {"pad_token": "<unk>"} if with_pad else {}
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   **extra)


def save_tiny(folder, family: str = "llama", seed: int = 0, layers: int = 3, dtype=None, model=None):
    """Save a tiny model (``model`` or a fresh one) with the tiny tokenizer; return the model."""
    model = model if model is not None else tiny_model(family, layers=layers, seed=seed)
    if dtype is not None:
        model = model.to(dtype)
    model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return model


def float_logs(terms) -> dict[str, float]:
    """A method's logged values as floats: methods log 0-d tensors (one sync per step, in the loop),
    and ``pytest.approx`` compares numbers, not tensors (pytest >= 9.2 refuses to iterate a 0-d tensor)."""
    return {k: float(v) for k, v in terms.logs.items()}
