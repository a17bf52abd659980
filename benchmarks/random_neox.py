"""Issue 18's model shape with random weights, the one builder both benchmark scripts use.

GPT-NeoX as EleutherAI/deep-ignorance-unfiltered (Pythia-6.9B layout): 32 layers, hidden 4096,
intermediate 16384, 32 heads, rotary_pct 0.25, vocab 50304, parallel residual, untied head. Timing
needs no trained weights, so nothing is fetched: the model is initialised on the device.
"""

from __future__ import annotations

DIMS_6P9B = dict(num_hidden_layers=32, hidden_size=4096, intermediate_size=16384, num_attention_heads=32)
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
