"""Losses on hand-made tensors, against values computed by hand."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from unlearning.training import hidden_losses as H
from unlearning.training import losses as L
from unlearning.core.errors import NonFiniteLossError, UserError


def approx(x, rel=1e-5, abs=1e-6):
    return pytest.approx(x, rel=rel, abs=abs)


def logits_of(*probs_rows):
    """[1, len(rows), V] logits whose softmax is each given row of probabilities."""
    return torch.tensor([[[math.log(p) for p in row] for row in probs_rows]])


# ----------------------------------------------------------------------------- masked mean

def test_masked_mean_counts_tokens_not_sequences():
    values = torch.tensor([[1.0, 99.0, 99.0], [2.0, 3.0, 4.0]])
    mask = torch.tensor([[1, 0, 0], [1, 1, 1]])
    # (1 + 2 + 3 + 4) / 4 tokens, not the mean of the per-sequence means (1 + 3) / 2
    assert L.masked_mean(values, mask).item() == approx(2.5)


def test_masked_mean_all_masked_is_zero_with_gradient():
    values = torch.tensor([[1.0, float("nan")]], requires_grad=True)
    out = L.masked_mean(values, torch.zeros(1, 2, dtype=torch.bool))
    out.backward()
    assert out.item() == 0.0
    assert torch.equal(values.grad, torch.zeros(1, 2))


def test_mask_shape_is_checked():
    with pytest.raises(ValueError, match="mask has shape"):
        L.max_entropy_kl(torch.zeros(2, 3, 5), torch.ones(2, 4))


# ----------------------------------------------------------------------------- forget losses

def test_max_entropy_kl_uniform_is_exactly_one():
    for const in (0.0, 7.5, -3.0):
        logits = torch.full((2, 3, 11), const)
        assert L.max_entropy_kl(logits, torch.ones(2, 3)).item() == approx(1.0)


def test_max_entropy_kl_peaked_matches_formula():
    V, a = 5, 3.0
    logits = torch.zeros(1, 1, V)
    logits[0, 0, 2] = a
    # log p_top = a - log(e^a + V - 1), log p_other = -log(e^a + V - 1)
    # CE(U, p) = -(1/V) sum log p = log(e^a + V - 1) - a / V
    expected = (math.log(math.exp(a) + V - 1) - a / V) / math.log(V)
    assert L.max_entropy_kl(logits, torch.ones(1, 1)).item() == approx(expected)
    # ... and 1 + KL(U || p) / log V by the definition
    p = torch.softmax(logits[0, 0], -1)
    kl = sum((1 / V) * math.log((1 / V) / p[i].item()) for i in range(V))
    assert expected == approx(1 + kl / math.log(V))


def test_topk_entropy_uniform_over_top_k_is_one_and_ignores_the_tail():
    logits = torch.tensor([[[3.0, 3.0, 3.0, 0.0, -1.0, -2.0]]])
    assert L.topk_entropy(logits, torch.ones(1, 1), k=3).item() == approx(1.0)
    tail_changed = torch.tensor([[[3.0, 3.0, 3.0, 2.9, -50.0, 1.0]]])
    assert L.topk_entropy(tail_changed, torch.ones(1, 1), k=3).item() == approx(1.0)


def test_topk_entropy_peaked_matches_formula():
    logits = torch.tensor([[[2.0, 1.0, 0.0, -5.0, -5.0, -5.0]]])
    # top 3 = [2, 1, 0]: (logsumexp - mean) / log 3
    expected = (math.log(math.e ** 2 + math.e + 1) - 1.0) / math.log(3)
    assert L.topk_entropy(logits, torch.ones(1, 1), k=3).item() == approx(expected)
    assert expected == approx(1.28126, rel=1e-4)


def test_topk_entropy_rejects_bad_k():
    with pytest.raises(UserError, match="top_k"):
        L.topk_entropy(torch.zeros(1, 1, 6), torch.ones(1, 1), k=1)
    with pytest.raises(UserError, match="top_k"):
        L.topk_entropy(torch.zeros(1, 1, 6), torch.ones(1, 1), k=7)


def test_random_target_ce_by_hand():
    logits = logits_of([1 / 8, 1 / 8, 2 / 8, 4 / 8])
    mask = torch.ones(1, 1)
    # target 3: -log(1/2) = log 2; normalised by log 4 -> 0.5
    assert L.random_target_ce(logits, mask, torch.tensor([[3]])).item() == approx(0.5)
    assert L.random_target_ce(logits, mask, torch.tensor([[0]])).item() == approx(1.5)
    assert L.random_target_ce(logits, mask, torch.tensor([[3]]), normalize=False).item() == approx(math.log(2))
    # uniform output reads 1.0 whatever the target
    assert L.random_target_ce(torch.zeros(1, 2, 9), torch.ones(1, 2), torch.tensor([[0, 8]])).item() == approx(1.0)


def test_random_target_ce_averaged_over_all_targets_is_max_entropy_kl():
    V = 7
    row = torch.randn(V, generator=torch.Generator().manual_seed(0))
    logits = row.expand(1, V, V).clone()          # the same distribution at V positions
    targets = torch.arange(V).unsqueeze(0)         # every target once
    mask = torch.ones(1, V)
    assert L.random_target_ce(logits, mask, targets).item() == approx(L.max_entropy_kl(logits, mask).item())


def test_draw_random_targets_is_seeded_and_in_range():
    a = L.draw_random_targets((3, 5), 11, torch.Generator().manual_seed(4))
    b = L.draw_random_targets((3, 5), 11, torch.Generator().manual_seed(4))
    c = L.draw_random_targets((3, 5), 11, torch.Generator().manual_seed(5))
    assert a.shape == (3, 5) and torch.equal(a, b) and not torch.equal(a, c)
    assert int(a.min()) >= 0 and int(a.max()) < 11


def test_token_logprobs_shift_and_nll_by_hand():
    # position t's logits predict labels[t + 1]
    logits = logits_of([1 / 4, 3 / 4], [1 / 2, 1 / 2], [0.9, 0.1])
    labels = torch.tensor([[0, 1, 0]])
    lp = L.token_logprobs(logits, labels)
    assert lp.shape == (1, 2)
    assert lp[0, 0].item() == approx(math.log(3 / 4))
    assert lp[0, 1].item() == approx(math.log(1 / 2))
    mask = torch.ones(1, 3)
    assert L.nll(logits, labels, mask).item() == approx(-(math.log(3 / 4) + math.log(1 / 2)) / 2)
    # mask[:, t] selects the prediction OF token t: masking token 2 leaves only token 1
    assert L.nll(logits, labels, torch.tensor([[1, 1, 0]])).item() == approx(-math.log(3 / 4))
    # labels of -100 are ignored, as in Hugging Face
    assert L.nll(logits, torch.tensor([[0, 1, -100]]), mask).item() == approx(-math.log(3 / 4))


def test_nll_matches_cross_entropy_on_shifted_tokens():
    g = torch.Generator().manual_seed(1)
    logits, labels = torch.randn(2, 6, 10, generator=g), torch.randint(0, 10, (2, 6), generator=g)
    ref = F.cross_entropy(logits[:, :-1].reshape(-1, 10), labels[:, 1:].reshape(-1))
    assert L.nll(logits, labels, torch.ones(2, 6)).item() == approx(ref.item())


def test_next_token_mask():
    mask = torch.tensor([[1, 1, 1, 0]])
    labels = torch.tensor([[5, -100, 6, 7]])
    assert L.next_token_mask(mask).tolist() == [[True, True, False]]
    assert L.next_token_mask(mask, labels).tolist() == [[False, True, False]]


def test_npo_is_log_two_when_model_equals_reference():
    lp = torch.log(torch.tensor([[0.3, 0.1, 0.5], [0.2, 0.2, 0.9]]))
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    for beta in (0.1, 1.0, 10.0):
        assert L.npo_per_sequence(lp, lp.clone(), mask, beta).item() == approx(math.log(2))
        assert L.npo_per_token(lp, lp.clone(), mask, beta).item() == approx(math.log(2))


def test_npo_by_hand():
    logp = torch.log(torch.tensor([[0.5, 0.25], [0.5, 0.5]])).requires_grad_()
    ref = torch.log(torch.tensor([[0.5, 0.5], [0.5, 0.5]])).requires_grad_()
    mask = torch.tensor([[1, 1], [0, 0]])   # second sequence has no valid token: left out
    # per token: diffs [0, -log 2] -> softplus: log 2, log(1 + 1/2)
    assert L.npo_per_token(logp, ref, mask, 1.0).item() == approx((math.log(2) + math.log(1.5)) / 2)
    # per sequence: delta = -log 2 -> log(1 + 2^-beta)
    assert L.npo_per_sequence(logp, ref, mask, 1.0).item() == approx(math.log(1.5))
    out = L.npo_per_sequence(logp, ref, mask, 2.0)
    assert out.item() == approx(math.log(1.25))
    out.backward()
    assert ref.grad is None                          # the reference is a constant
    assert logp.grad[1].abs().sum() == 0             # masked sequence gets no gradient


# ----------------------------------------------------------------------------- retain losses

def test_hidden_l2_by_hand():
    cur = {3: torch.tensor([[[3.0, 4.0], [1.0, 0.0]]]), 7: torch.tensor([[[0.0, 2.0], [0.0, 0.0]]])}
    orig = {3: torch.zeros(1, 2, 2), 7: torch.zeros(1, 2, 2), 9: torch.ones(1, 2, 2)}
    # layer 3 norms [5, 1], layer 7 norms [2, 0]
    assert H.hidden_l2(cur, orig, torch.ones(1, 2)).item() == approx((3.0 + 1.0) / 2)
    assert H.hidden_l2(cur, orig, torch.tensor([[1, 0]])).item() == approx((5.0 + 2.0) / 2)
    with pytest.raises(ValueError, match="not in the reference"):
        H.hidden_l2({4: cur[3]}, orig, torch.ones(1, 2))


def test_hidden_l2_gradient_is_finite_at_zero_difference():
    h = torch.randn(2, 3, 4, requires_grad=True)
    out = H.hidden_l2({0: h}, {0: h.detach().clone()}, torch.ones(2, 3))
    out.backward()
    assert out.item() == 0.0 and torch.isfinite(h.grad).all()


def test_kl_retain_by_hand():
    original = logits_of([1 / 2, 1 / 2], [0.3, 0.7])
    current = logits_of([1 / 4, 3 / 4], [0.3, 0.7])
    # KL(p || q) = 1/2 log(2) + 1/2 log(2/3) = 1/2 log(4/3); second position identical -> 0
    assert L.kl_retain(current, original, torch.tensor([[1, 0]])).item() == approx(0.5 * math.log(4 / 3))
    assert L.kl_retain(current, original, torch.ones(1, 2)).item() == approx(0.25 * math.log(4 / 3))
    # direction: KL(original || current), not the reverse
    reverse = 0.25 * math.log(0.5) + 0.75 * math.log(1.5)
    assert L.kl_retain(original, current, torch.tensor([[1, 0]])).item() == approx(reverse)


# ----------------------------------------------------------------------------- representation losses

def test_mse_to_teacher_by_hand():
    cur = {5: torch.tensor([[[1.0, 2.0, 3.0], [1.0, 1.0, 1.0]]]), 10: torch.ones(1, 2, 3)}
    teacher = {5: torch.zeros(1, 2, 3), 10: torch.ones(1, 2, 3)}
    # layer 5: token means of squares 14/3 and 1, layer 10: 0
    assert H.mse_to_teacher(cur, teacher, torch.ones(1, 2)).item() == approx(((14 / 3 + 1) / 2 + 0) / 2)
    assert H.mse_to_teacher(cur, teacher, torch.tensor([[1, 0]])).item() == approx((14 / 3) / 2)


def test_relu_cosine_by_hand():
    orig = {1: torch.tensor([[[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [1.0, 0.0]]])}
    cur = {1: torch.tensor([[[2.0, 0.0], [0.0, 3.0], [-1.0, 0.0], [1.0, 1.0]]])}
    # cosines 1, 0, -1 (ReLU -> 0), 1/sqrt 2
    assert H.relu_cosine(cur, orig, torch.ones(1, 4)).item() == approx((1 + 0 + 0 + 2 ** -0.5) / 4)
    assert H.relu_cosine(cur, orig, torch.tensor([[1, 0, 0, 0]])).item() == approx(1.0)


def test_orthogonality_by_hand():
    one = torch.ones(2, 1)
    assert H.orthogonality(torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]]), one).item() == approx(0.0)
    assert H.orthogonality(torch.tensor([[[1.0, 2.0]], [[2.0, 4.0]]]), one).item() == approx(1.0)
    assert H.orthogonality(torch.tensor([[[1.0, 0.0]], [[-1.0, 0.0]]]), one).item() == approx(0.0)
    # mean pooling over valid tokens: item 0 pools to [0.5, 0.5]; its masked token is ignored
    acts = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [0.0, 100.0]], [[1.0, 0.0], [1.0, 0.0], [0.0, 0.0]]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]])
    assert H.orthogonality(acts, mask).item() == approx(2 ** -0.5)
    # per-layer dict: mean over layers
    layers = {0: acts, 1: torch.tensor([[[1.0, 0.0]] * 3, [[0.0, 1.0]] * 3])}
    assert H.orthogonality(layers, mask).item() == approx(2 ** -0.5 / 2)


def test_orthogonality_leaves_out_empty_items():
    acts = torch.tensor([[[1.0, 0.0]], [[1.0, 0.0]], [[0.0, 1.0]]])
    assert H.orthogonality(acts, torch.tensor([[1], [1], [0]])).item() == approx(1.0)
    single = H.orthogonality(acts.requires_grad_(), torch.tensor([[1], [0], [0]]))
    single.backward()
    assert single.item() == 0.0 and torch.isfinite(acts.grad).all()


def test_rmu_by_hand():
    acts = torch.tensor([[[1.0, 2.0], [5.0, 5.0]]])
    control = torch.tensor([1.0, 0.0])
    # ((1 - 1)^2 + 2^2) / 2 = 2 on the one valid token
    assert H.rmu_forget(acts, control, torch.tensor([[1, 0]])).item() == approx(2.0)
    orig = torch.tensor([[[0.0, 0.0], [5.0, 3.0]]])
    assert H.rmu_retain(acts, orig, torch.ones(1, 2)).item() == approx(((1 + 4) / 2 + 4 / 2) / 2)
    assert H.rmu_retain(acts, orig, torch.ones(1, 2)).item() == approx(F.mse_loss(acts, orig).item())


def test_rmu_control_vector():
    v = H.rmu_control_vector(16, 6.5, torch.Generator().manual_seed(0))
    w = H.rmu_control_vector(16, 6.5, torch.Generator().manual_seed(0))
    assert v.shape == (16,) and torch.equal(v, w)
    assert v.norm().item() == approx(6.5) and bool((v >= 0).all())


def test_argmax_agreement_by_hand():
    a = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]]])
    b = torch.tensor([[[2.0, 0.0], [0.0, 3.0], [1.0, 5.0], [0.0, 1.0]]])
    assert L.argmax_agreement(a, b, torch.ones(1, 4)).item() == approx(0.75)
    assert L.argmax_agreement(a, b, torch.tensor([[1, 1, 0, 1]])).item() == approx(1.0)
    assert L.argmax_agreement(a, b, torch.zeros(1, 4)).item() == 0.0


# ----------------------------------------------------------------------------- l2sp and checks

def test_l2sp_by_hand():
    w = torch.tensor([1.0, 2.0], requires_grad=True)
    m = torch.tensor([[1.0, 1.0]], requires_grad=True)
    out = L.l2sp([w, m], [torch.zeros(2), torch.tensor([[1.0, 0.0]])])
    assert out.item() == approx(1 + 4 + 0 + 1)
    out.backward()
    assert w.grad.tolist() == [2.0, 4.0] and m.grad.tolist() == [[0.0, 2.0]]
    assert L.l2sp({"a": w}, {"a": torch.zeros(2)}).item() == approx(5.0)
    assert L.l2sp([], []).item() == 0.0
    with pytest.raises(ValueError):
        L.l2sp({"a": w}, {"b": torch.zeros(2)})


def test_check_finite_names_step_layer_and_term():
    L.check_finite("forget", torch.tensor(1.5), step=3, layer=2)
    with pytest.raises(NonFiniteLossError) as err:
        L.check_finite("forget_loss", torch.tensor(float("nan")), step=7, layer=23)
    message = str(err.value)
    assert "'forget_loss'" in message and "step 7" in message and "layer 23" in message
    assert isinstance(err.value, UserError)
    with pytest.raises(NonFiniteLossError, match="step 1"):
        L.check_finite("retain", float("inf"), step=1)


@pytest.mark.parametrize("settings, dtype, says, not_says", [
    ({"max_grad_norm": 1.0}, torch.float32, ["optimizer.lr is 0.001", "'forget'"], ["clip", "fp16"]),
    ({"max_grad_norm": 0.0}, torch.float32, ["clipping is off"], ["fp16"]),
    ({"max_grad_norm": 1.0}, torch.float16, ["fp16 overflows"], ["clip"]),
])
def test_the_nan_advice_fits_the_runs_settings(settings, dtype, says, not_says):
    from unlearning.core.config import from_dict
    from unlearning.training.loop import TrainConfig, nonfinite_advice
    cfg = from_dict(TrainConfig, {"optimizer": {"lr": 1e-3}, **settings})
    with pytest.raises(NonFiniteLossError) as err:
        L.check_finite("forget", float("nan"), step=1, advice=nonfinite_advice(cfg, dtype))
    message = str(err.value)
    assert all(s in message for s in says) and not any(s in message for s in not_says), message


# ----------------------------------------------------------------------------- shared properties

def _token_losses():
    """(name, fn(logits_or_acts, mask) -> scalar, input width) for every token-level loss."""
    # targets depend on the position only, so a repeated or padded batch keeps them
    targets_of = lambda x: ((torch.arange(x.shape[1]) * 7) % x.shape[-1]).expand(x.shape[:2])
    ref_of = lambda x: x.flip(-1) * 0.5 + 0.1      # a deterministic, different reference
    return [
        ("random_target_ce", lambda x, m: L.random_target_ce(x, m, targets_of(x))),
        ("max_entropy_kl", L.max_entropy_kl),
        ("topk_entropy", lambda x, m: L.topk_entropy(x, m, k=3)),
        ("kl_retain", lambda x, m: L.kl_retain(x, ref_of(x), m)),
        ("nll", lambda x, m: L.nll(x, targets_of(x), m)),
        ("npo_per_token", lambda x, m: L.npo_per_token(x[..., 0], x[..., 1], m, 2.0)),
        ("npo_per_sequence", lambda x, m: L.npo_per_sequence(x[..., 0], x[..., 1], m, 2.0)),
        ("hidden_l2", lambda x, m: H.hidden_l2({1: x}, {1: ref_of(x)}, m)),
        ("mse_to_teacher", lambda x, m: H.mse_to_teacher({1: x}, {1: ref_of(x)}, m)),
        ("relu_cosine", lambda x, m: H.relu_cosine({1: x}, {1: ref_of(x)}, m)),
        ("rmu_forget", lambda x, m: H.rmu_forget(x, torch.ones(x.shape[-1]), m)),
        ("rmu_retain", lambda x, m: H.rmu_retain(x, ref_of(x), m)),
    ]


@pytest.mark.parametrize("name,fn", _token_losses(), ids=[n for n, _ in _token_losses()])
def test_masked_positions_and_batch_size_do_not_change_the_value(name, fn):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 6, generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    base = fn(x, mask).item()
    # garbage at masked positions
    y = x.clone()
    y[0, 3:] = 1e3 * torch.randn(2, 6, generator=g)
    assert fn(y, mask).item() == approx(base, rel=1e-5), "masked positions changed the value"
    # the same batch twice: the mean is unchanged
    assert fn(torch.cat([x, x]), torch.cat([mask, mask])).item() == approx(base, rel=1e-5)
    # extra padding positions
    pad = torch.cat([x, 50 * torch.randn(2, 3, 6, generator=g)], dim=1)
    pad_mask = torch.cat([mask, torch.zeros(2, 3, dtype=torch.bool)], dim=1)
    assert fn(pad, pad_mask).item() == approx(base, rel=1e-5)


@pytest.mark.parametrize("name,fn", _token_losses(), ids=[n for n, _ in _token_losses()])
def test_all_zero_mask_gives_zero_with_finite_gradient(name, fn):
    x = torch.randn(2, 4, 6, requires_grad=True)
    out = fn(x, torch.zeros(2, 4))
    out.backward()
    assert out.item() == 0.0
    assert x.grad is not None and torch.isfinite(x.grad).all()



def test_low_precision_inputs_are_computed_in_float32():
    logits = torch.randn(2, 3, 50, generator=torch.Generator().manual_seed(3))
    mask = torch.ones(2, 3)
    out = L.max_entropy_kl(logits.bfloat16(), mask)
    assert out.dtype == torch.float32
    assert out.item() == approx(L.max_entropy_kl(logits.bfloat16().float(), mask).item())
    assert L.kl_retain(logits.half(), logits.half() * 0.5, mask).dtype == torch.float32
