"""Token masks: keyword, activation, probe, SAE and hazard masks; the cache; quality; the command."""

from __future__ import annotations

import json

import pytest
import torch

from tiny_models import save_tiny, tiny_model, tiny_tokenizer
from unlearning.masking import masks
from unlearning.core.config import from_dict
from unlearning.core.errors import ConfigError, UserError
from unlearning.data.text import TokenizedData, mix
from unlearning.masking.models import (ScorerTrainConfig, load_scorer, resolve_artifact, save_scorer, train_probe,
                                    train_sae, train_scorer)
from unlearning.masking.masks import MaskConfig, apply_mask, compute_mask, keyword_mask, mask_quality

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("UNLEARNING_HOME", str(tmp_path / "home"))


def words(rows: list[list[int]], seq_len: int = 8) -> TokenizedData:
    ids = torch.zeros(len(rows), seq_len, dtype=torch.long)
    attn = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        attn[i, : len(r)] = 1
    return TokenizedData(ids, attn)


def token_data(lo: int, hi: int, n: int = 12, seq_len: int = 10, seed: int = 0) -> TokenizedData:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(lo, hi, (n, seq_len), generator=g)
    return TokenizedData(ids, torch.ones_like(ids))


# ----------------------------------------------------------------------------------------------- keyword

def test_keyword_mask_marks_matching_tokens_and_window():
    tok = tiny_tokenizer()
    data = words([[3, 10, 33, 4], [12, 5, 6]])
    m = keyword_mask(data, tok, [r"\bw1\d\b"])
    assert m.tolist()[0][:4] == [False, True, False, False] and m.tolist()[1][:3] == [True, False, False]
    m = keyword_mask(data, tok, [r"\bw1\d\b"], window=2)
    assert m.tolist()[0][:4] == [False, True, True, True]
    assert not m[:, 4:].any() and not m[1, 3:].any()           # never beyond the row's tokens
    # a multi-token match marks every token it overlaps; matching is case-insensitive
    assert keyword_mask(data, tok, [r"W3 w10"]).tolist()[0][:3] == [True, True, False]


@pytest.mark.parametrize("style", ["byte_level", "sentencepiece"])
def test_keyword_mask_on_bpe_tokenizers(style):
    from tokenizers import SentencePieceBPETokenizer, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    text = "The natural host of Zorvex virus is the grey bat. It spreads through droplets, é."
    if style == "byte_level":
        raw = Tokenizer(models.BPE())
        raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        raw.decoder = decoders.ByteLevel()
        raw.train_from_iterator([text] * 5, trainers.BpeTrainer(vocab_size=300,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    else:  # Llama-style: "▁" marks spaces and the decoder drops the leading one
        raw = SentencePieceBPETokenizer()
        raw.train_from_iterator([text] * 5, vocab_size=120)
    tok = PreTrainedTokenizerFast(tokenizer_object=raw._tokenizer if style != "byte_level" else raw)
    ids = tok(text)["input_ids"]
    data = TokenizedData(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long))
    m = keyword_mask(data, tok, masks.DEFAULT_KEYWORDS)
    marked = tok.decode([t for t, keep in zip(ids, m[0].tolist()) if keep])
    assert "virus" in marked and "spreads" in marked and "grey" not in marked


def test_mask_config_validation():
    with pytest.raises(ConfigError, match="keywords"):
        from_dict(MaskConfig, {"kind": "keyword", "keywords": ["(unclosed"]})
    with pytest.raises(ConfigError, match="kind"):
        from_dict(MaskConfig, {"kind": "magic"})


# ----------------------------------------------------------------------------------------------- cache

def test_cache_is_keyed_by_data_tokenizer_and_settings(monkeypatch):
    tok = tiny_tokenizer()
    calls = []
    real = masks.keyword_mask
    monkeypatch.setattr(masks, "keyword_mask", lambda *a, **k: calls.append(1) or real(*a, **k))
    cfg = MaskConfig(kind="keyword", keywords=[r"\bw1\d\b"])
    data = words([[3, 10, 33, 4]])
    first = compute_mask(cfg, data, tokenizer=tok)
    again = compute_mask(cfg, data, tokenizer=tok)
    assert torch.equal(first, again) and len(calls) == 1            # second call came from the cache
    changed = words([[3, 4, 33, 10]])                               # same shape, different tokens
    assert compute_mask(cfg, changed, tokenizer=tok).tolist()[0][:4] == [False, False, False, True]
    assert len(calls) == 2                                          # a changed dataset is never served stale
    compute_mask(MaskConfig(kind="keyword", keywords=[r"\bw1\d\b"], window=1), data, tokenizer=tok)
    assert len(calls) == 3
    compute_mask(MaskConfig(kind="keyword", keywords=[r"\bw1\d\b"], cache=False), data, tokenizer=tok)
    assert len(calls) == 4
    assert len(list((masks.cache_dir()).glob("keyword-*.safetensors"))) == 3


# ----------------------------------------------------------------------------------------------- quality, plumbing

def test_mask_quality_share_precision_recall():
    mask = torch.tensor([[1, 1, 0, 0, 0], [0, 1, 1, 0, 0]], dtype=torch.bool)
    attn = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]])
    truth = torch.tensor([[1, 0, 0, 1, 1], [0, 1, 0, 0, 0]], dtype=torch.bool)
    q = mask_quality(mask, attn, truth)
    assert q["tokens"] == 9 and q["masked"] == 4 and q["share"] == pytest.approx(4 / 9)
    assert q["precision"] == pytest.approx(2 / 4)
    assert q["recall"] == pytest.approx(2 / 3)   # the padded truth token at [0, 4] does not count
    assert "precision" not in mask_quality(mask, attn, None)


def test_apply_mask_stores_it_on_the_data_and_batches_carry_it():
    data = {"forget": words([[3, 10, 33, 4], [12, 5, 6]]), "retain": words([[7, 8]])}
    data["forget"].hazard_labels = torch.zeros(2, 8, dtype=torch.bool)
    data["forget"].hazard_labels[0, 1] = True
    q = apply_mask(MaskConfig(kind="keyword", keywords=[r"\bw1\d\b"]), data, tokenizer=tiny_tokenizer(),
                   model=None, device=CPU)
    assert q["masked"] == 2 and q["precision"] == 0.5 and q["recall"] == 1.0
    batch = data["forget"].rows(torch.tensor([1, 0]))
    assert batch["loss_mask"][0, 0] and batch["loss_mask"][1, 1]
    mixed = mix(data["forget"], data["forget"], 0.5)
    assert mixed.loss_mask is not None and mixed.loss_mask.shape == mixed.input_ids.shape
    with pytest.raises(UserError, match="selects no forget token"):
        apply_mask(MaskConfig(kind="keyword", keywords=["nothing-matches"]), data, tokenizer=tiny_tokenizer(),
                   model=None, device=CPU)


def test_hazard_mask_is_the_true_spans():
    d = words([[3, 4, 5]])
    with pytest.raises(UserError, match="hazard"):
        compute_mask(MaskConfig(kind="hazard"), d, tokenizer=None)
    d.hazard_labels = torch.zeros(1, 8, dtype=torch.bool)
    d.hazard_labels[0, [1, 6]] = True   # 6 is padding
    assert compute_mask(MaskConfig(kind="hazard"), d, tokenizer=None)[0].nonzero().flatten().tolist() == [1]


# ----------------------------------------------------------------------------------------------- model-based masks

def test_activation_mask_selects_forget_like_tokens():
    model = tiny_model("gpt_neox", layers=4)
    retain = token_data(40, 61, seed=1)
    # half the forget rows are written in the retain vocabulary: those should mostly stay unmasked
    forget = token_data(3, 20)
    forget.input_ids[6:] = token_data(40, 61, n=6, seed=2).input_ids
    m = compute_mask(MaskConfig(kind="activation", layer=1, threshold=0.2), forget, tokenizer=tiny_tokenizer(),
                     model=model, retain=retain, device=CPU)
    # (a random model's activations are noisy: compare the two halves rather than fix levels)
    assert m[:6].float().mean() > m[6:].float().mean() + 0.4
    # a higher threshold keeps fewer tokens
    strict = compute_mask(MaskConfig(kind="activation", layer=1, threshold=0.5), forget, tokenizer=tiny_tokenizer(),
                          model=model, retain=retain, device=CPU)
    assert strict.sum() < m.sum() and not (strict & ~m).any()
    # a changed model is a different cache key
    other = tiny_model("gpt_neox", layers=4, seed=3)
    assert masks.model_fingerprint(other, 1) != masks.model_fingerprint(model, 1)


def test_probe_and_sae_learn_a_separable_direction_and_round_trip(tmp_path):
    g = torch.Generator().manual_seed(0)
    direction = torch.randn(16, generator=g)
    retain = torch.randn(600, 16, generator=g)
    forget = torch.randn(600, 16, generator=g) + 3 * direction / direction.norm()
    cfg = ScorerTrainConfig(steps=200)
    probe, stats = train_probe(forget, retain, layer=2, cfg=cfg)
    assert stats["balanced_accuracy"] > 0.9
    path = save_scorer(probe, tmp_path / "p.safetensors", {"model": "x"})
    loaded = load_scorer(path)
    assert loaded.layer == 2 and torch.allclose(loaded.score(forget[:5]), probe.score(forget[:5]))
    sae, stats = train_sae(forget, retain, layer=2, cfg=ScorerTrainConfig(steps=300, expansion=4, batch_size=256))
    assert stats["explained_variance"] > 0.3 and stats["best_latent_score"] > 0.3
    path = save_scorer(sae, tmp_path / "s.safetensors", {"model": "x"})
    loaded = load_scorer(path, top_latents=3)
    assert loaded.selected.numel() == 3
    fires_f = (loaded.score(forget) > 0).float().mean()
    fires_r = (loaded.score(retain) > 0).float().mean()
    assert fires_f > fires_r + 0.3


@pytest.mark.parametrize("kind", ["probe", "sae"])
def test_trained_scorer_masks_through_the_model_and_the_default_path(kind, tmp_path):
    model = tiny_model("gpt_neox", layers=4)
    forget, retain = token_data(3, 20, n=16), token_data(40, 61, n=16, seed=1)
    cfg = ScorerTrainConfig(steps=150, expansion=2, batch_size=64)
    mcfg = MaskConfig(kind=kind, layer=2, top_latents=3)
    with pytest.raises(UserError, match="unlearn mask train"):
        resolve_artifact(mcfg, model, "tiny-model")
    scorer, stats = train_scorer(kind, model, forget, retain, 2, CPU, cfg)
    from unlearning.masking.models import default_artifact_path
    save_scorer(scorer, default_artifact_path("tiny-model", kind, 2), {"model": "tiny-model", **stats})
    m = compute_mask(mcfg, forget, tokenizer=tiny_tokenizer(), model=model, device=CPU, model_name="tiny-model")
    m_retain = compute_mask(mcfg, retain, tokenizer=tiny_tokenizer(), model=model, device=CPU,
                            model_name="tiny-model")
    assert m.float().mean() > m_retain.float().mean() + 0.2
    with pytest.raises(ConfigError, match="layer"):
        compute_mask(MaskConfig(kind=kind, layer=1, artifact=str(default_artifact_path("tiny-model", kind, 2))),
                     forget, tokenizer=tiny_tokenizer(), model=model, device=CPU)


# ----------------------------------------------------------------------------------------------- the command

def test_mask_train_and_report_commands(tmp_path, capsys):
    save_tiny(tmp_path / "model", family="gpt_neox", layers=4)
    g = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(12):
        ids = torch.randint(3, 20, (8,), generator=g).tolist()
        text = " ".join(f"w{i}" for i in ids)
        rows.append({"text": text, "hazard_spans": [[0, len(text.split()[0])]]})
    (tmp_path / "f.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "r.jsonl").write_text("".join(
        json.dumps({"text": " ".join(f"w{i}" for i in torch.randint(40, 61, (8,), generator=g).tolist())}) + "\n"
        for _ in range(12)))
    from unlearning.cli import main
    common = ["--model", str(tmp_path / "model"), "--forget", str(tmp_path / "f.jsonl"),
              "--retain", str(tmp_path / "r.jsonl"), "--seq-len", "12", "--device", "cpu", "--layer", "2"]
    assert main(["mask", "train", "--kind", "probe", *common, "--steps", "50",
                 "--out", str(tmp_path / "probe.safetensors")]) == 0
    assert "saved to" in capsys.readouterr().out
    assert main(["mask", "report", *common, "--kind", "keyword,probe,hazard", "--keywords", r"\bw1\d\b",
                 "--artifact", str(tmp_path / "probe.safetensors")]) == 0
    out = capsys.readouterr().out
    lines = {line.split("|")[1].strip(): line for line in out.splitlines()[2:]}
    assert set(lines) == {"keyword", "probe", "hazard"}
    hazard = [c.strip() for c in lines["hazard"].split("|")]
    assert hazard[4:6] == ["1.0000", "1.0000"]   # the oracle: precision and recall 1
