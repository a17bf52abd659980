"""Issue 18's model shape with random weights, the one builder every benchmark script uses (also saved as a
folder with the GPT-NeoX-20B tokenizer, for the commands that load one).

GPT-NeoX as EleutherAI/deep-ignorance-unfiltered (Pythia-6.9B layout): 32 layers, hidden 4096,
intermediate 16384, 32 heads, rotary_pct 0.25, vocab 50304, parallel residual, untied head. Timing
needs no trained weights, so nothing is fetched: the model is initialised on the device.
"""

from __future__ import annotations

from pathlib import Path

DIMS_6P9B = dict(num_hidden_layers=32, hidden_size=4096, intermediate_size=16384, num_attention_heads=32)
NEOX_SHAPES = {"6.9b": DIMS_6P9B,  # the evaluation benchmark's shapes by name (tiny: its CPU test)
               "tiny": dict(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4)}
BF16_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "GH200": 989.0}  # dense, no sparsity


def peak_tflops(device) -> float | None:
    """The bf16 dense peak of a CUDA device (MFU's denominator); None on a CPU or an unknown GPU."""
    import torch
    if torch.device(device).type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in BF16_PEAK_TFLOPS.items() if k in name), None)


def build_random_neox(dims: dict, *, device: str = "cuda", dtype: str = "bfloat16", seed: int = 0):
    """A random-weight GPT-NeoX with ``dims`` (the four size keys of a GPTNeoXConfig), built on ``device``."""
    import torch
    import transformers

    config = transformers.GPTNeoXConfig(vocab_size=50304, rotary_pct=0.25, use_parallel_residual=True,
                                        tie_word_embeddings=False, max_position_embeddings=2048,
                                        attention_dropout=0.0, hidden_dropout=0.0,
                                        bos_token_id=0, eos_token_id=0, **dims)
    torch.manual_seed(seed)
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype),
                                                              attn_implementation="sdpa")
    model.config.use_cache = False
    return model


def random_neox(shape: str = "6.9b", device: str = "cuda", dtype: str = "bfloat16", seed: int = 0):
    """A random-weight GPT-NeoX of ``shape`` (built on ``device``) and the GPT-NeoX-20B tokenizer."""
    from unlearning.data import real as realdata

    model = build_random_neox(NEOX_SHAPES[shape], device=device, dtype=dtype, seed=seed)
    return model.eval(), realdata.load_tokenizer()


def save_random_neox(folder: str | Path, shape: str = "6.9b", device: str = "cuda", dtype: str = "bfloat16",
                     seed: int = 0):
    """:func:`random_neox`, saved to ``folder`` (HF layout, tokenizer included); returns (model, tokenizer)."""
    model, tokenizer = random_neox(shape, device=device, dtype=dtype, seed=seed)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model, tokenizer
