"""The LITE loss: hand-computable values, weighting, response-only masking, modes, parity with transformers."""

import math

import pytest
import torch
import torch.nn.functional as F

from lite import load_model
from lite.training.losses import LOSS_MODES, distill_loss, lite_loss


def _head(weight):
    head = torch.nn.Linear(len(weight[0]), len(weight), bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.tensor(weight, dtype=torch.float32))
    return head


@pytest.mark.parametrize("mode", LOSS_MODES)
def test_hand_computed_values(mode):
    # V=3, D=2; head rows e0, e1, 0 -> logits = (h0, h1, 0)
    head = _head([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
    # one sequence of 3 positions; labels: position 0 is prompt, tokens 1 and 2 are response
    labels = torch.tensor([[-100, 0, 2]])
    # position 0 predicts label[1]=0, position 1 predicts label[2]=2, position 2 predicts nothing
    s1 = torch.tensor([[[1.0, 0.0], [0.0, 0.0], [9.0, 9.0]]])
    s2 = torch.tensor([[[0.0, 0.0], [0.0, 2.0], [-9.0, 5.0]]])
    out = lite_loss({1: s1, 2: s2}, labels, head, {1: 1.0, 2: 3.0}, mode=mode, chunk_size=1)
    # layer 1: CE([1,0,0], 0) = log(e+2) - 1 ; CE([0,0,0], 2) = log 3
    l1 = ((math.log(math.e + 2) - 1) + math.log(3)) / 2
    # layer 2: CE([0,0,0], 0) = log 3 ; CE([0,2,0], 2) = log(2 + e^2)
    l2 = (math.log(3) + math.log(2 + math.e ** 2)) / 2
    assert out.num_tokens == 2
    assert out.per_layer[1].item() == pytest.approx(l1, abs=1e-5)
    assert out.per_layer[2].item() == pytest.approx(l2, abs=1e-5)
    assert out.total.item() == pytest.approx(0.25 * l1 + 0.75 * l2, abs=1e-5)  # weights normalised


@pytest.mark.parametrize("mode", LOSS_MODES)
def test_gradients_equal_direct_autograd(mode):
    torch.manual_seed(0)
    B, T, D, V = 2, 7, 5, 11
    head = torch.nn.Linear(D, V, bias=False)
    labels = torch.randint(0, V, (B, T))
    labels[:, :3] = -100
    labels[1, -1] = -100
    base = {k: torch.randn(B, T, D) for k in (1, 2, 4)}
    weights = {1: 1.0, 2: 1.0, 4: 2.0}

    states = {k: v.clone().requires_grad_() for k, v in base.items()}
    out = lite_loss(states, labels, head, weights, chunk_size=3, mode=mode)
    out.total.backward()
    got = [states[k].grad for k in (1, 2, 4)], head.weight.grad.clone()

    head.zero_grad()
    ref_states = {k: v.clone().requires_grad_() for k, v in base.items()}
    total = sum(w / 4.0 * F.cross_entropy(head(ref_states[k])[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1))
                for k, w in weights.items())
    total.backward()
    assert out.total.item() == pytest.approx(total.item(), rel=1e-5)
    for g, k in zip(got[0], (1, 2, 4)):
        torch.testing.assert_close(g, ref_states[k].grad)
    torch.testing.assert_close(got[1], head.weight.grad)


def test_prompt_positions_do_not_matter():
    torch.manual_seed(1)
    head = torch.nn.Linear(4, 9, bias=False)
    labels = torch.tensor([[-100, -100, -100, 3, 5, 1]])  # response = last 3 tokens
    s = torch.randn(1, 6, 4)
    ref = lite_loss({2: s}, labels, head, {2: 1.0}).total
    t = s.clone()
    t[:, :2] = 100.0  # positions 0, 1 predict prompt tokens: no loss there
    t[:, 5] = -100.0  # the last position predicts nothing
    assert lite_loss({2: t}, labels, head, {2: 1.0}).total.item() == pytest.approx(ref.item(), rel=1e-6)
    u = s.clone()
    u[:, 2] = 100.0  # position 2 predicts the first response token: the loss changes
    assert lite_loss({2: u}, labels, head, {2: 1.0}).total.item() != pytest.approx(ref.item(), rel=1e-3)


def test_no_response_tokens_gives_differentiable_zero():
    head = torch.nn.Linear(4, 9, bias=False)
    s = torch.randn(1, 3, 4, requires_grad=True)
    out = lite_loss({1: s}, torch.full((1, 3), -100), head, {1: 1.0})
    out.total.backward()
    assert out.num_tokens == 0 and out.total.item() == 0.0 and s.grad is not None


def test_per_layer_losses_match_transformers(tiny_model_dir):
    lm = load_model(tiny_model_dir, device="cpu")
    ids = torch.tensor([[5, 17, 42, 99, 3, 8, 11, 60], [7, 7, 30, 31, 32, 2, 0, 0]])
    mask = torch.tensor([[1] * 8, [1] * 6 + [0] * 2])
    labels = ids.clone()
    labels[:, :3] = -100
    labels[mask == 0] = -100
    with torch.no_grad():
        ref = lm.model(ids, attention_mask=mask, labels=labels, output_hidden_states=True)
        states = lm.forward_exit_states(ids, mask, layers=[1, 2, 3, 4])
        out = lite_loss(states, labels, lm.lm_head, {k: 1.0 for k in (1, 2, 3, 4)})
    for k in (1, 2, 3):
        logits = lm.model.lm_head(lm.model.model.norm(ref.hidden_states[k]))
        direct = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))
        assert out.per_layer[k].item() == pytest.approx(direct.item(), rel=1e-5)
    # the final exit is exactly transformers' own causal-LM loss (norm applied once)
    assert out.per_layer[4].item() == pytest.approx(ref.loss.item(), rel=1e-5)
    assert out.total.item() == pytest.approx(sum(v.item() for v in out.per_layer.values()) / 4, rel=1e-5)


def _kl(p: list[float], q: list[float]) -> float:
    return sum(a * (math.log(a) - math.log(b)) for a, b in zip(p, q))


def _softmax(z: list[float]) -> list[float]:
    e = [math.exp(v) for v in z]
    return [v / sum(e) for v in e]


def test_distill_loss_hand_computed():
    """KL(teacher || exit) at response positions, by hand: V=3, D=2, head rows e0, e1, 0."""
    head = _head([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
    labels = torch.tensor([[-100, 0, 2]])  # positions 0 and 1 count, position 2 does not
    teacher = torch.tensor([[[2.0, 0.0], [0.0, 1.0], [5.0, 5.0]]])
    s1 = torch.tensor([[[1.0, 0.0], [0.0, 0.0], [9.0, 9.0]]], requires_grad=True)
    s2 = torch.tensor([[[2.0, 0.0], [1.0, 1.0], [-9.0, 5.0]]], requires_grad=True)
    out = distill_loss({1: s1, 2: s2}, teacher, labels, head, {1: 1.0, 2: 3.0}, chunk_size=1)
    t0, t1 = _softmax([2, 0, 0]), _softmax([0, 1, 0])
    l1 = (_kl(t0, _softmax([1, 0, 0])) + _kl(t1, _softmax([0, 0, 0]))) / 2
    l2 = (_kl(t0, _softmax([2, 0, 0])) + _kl(t1, _softmax([1, 1, 0]))) / 2  # position 0 agrees: KL 0
    assert out.num_tokens == 2
    assert out.per_layer[1].item() == pytest.approx(l1, abs=1e-6)
    assert out.per_layer[2].item() == pytest.approx(l2, abs=1e-6)
    assert out.total.item() == pytest.approx(0.25 * l1 + 0.75 * l2, abs=1e-6)
    out.total.backward()
    assert s1.grad[0, 2].abs().sum() == 0 and s2.grad[0, 2].abs().sum() == 0  # the prompt-free tail: none
    # gradient of KL(t || softmax(z)) w.r.t. z is softmax(z) - t; through head rows e0, e1 to (h0, h1)
    q = _softmax([1, 0, 0])
    expected = torch.tensor([(q[0] - t0[0]), (q[1] - t0[1])]) * 0.25 / 2
    torch.testing.assert_close(s1.grad[0, 0], expected)


def test_distill_loss_is_zero_when_the_exit_is_the_teacher(tiny_model_dir):
    lm = load_model(tiny_model_dir, device="cpu")
    ids = torch.tensor([[5, 17, 42, 99, 3, 8]])
    labels = torch.tensor([[-100, -100, 42, 99, 3, 8]])
    states = lm.hidden_states(ids, layers=[2, 4])
    out = distill_loss(states, states[4].detach(), labels, lm.lm_head, {2: 1.0, 4: 1.0})
    assert out.per_layer[4].item() == pytest.approx(0.0, abs=1e-5)
    assert out.per_layer[2].item() > 0.01


@pytest.mark.parametrize("weight_grad", [False, True])
def test_fused_distill_matches_autograd(weight_grad):
    """The fused KL (gradients formed in forward) gives the plain autograd loss and gradients, for the exit
    states and, when the head is trained (full fine-tuning ties it to the embeddings), for its weight."""
    torch.manual_seed(0)
    B, T, D, V = 2, 7, 6, 11
    labels = torch.randint(0, V, (B, T))
    labels[0, :3] = -100
    labels[1, 5:] = -100
    base = {k: torch.randn(B, T, D) for k in (1, 2, 3)}
    teacher = torch.randn(B, T, D)
    results = {}
    for mode in ("plain", "checkpoint", "fused"):
        head = torch.nn.Linear(D, V, bias=False)
        with torch.no_grad():
            head.weight.copy_(torch.linspace(-1, 1, V * D).reshape(V, D))
        head.weight.requires_grad_(weight_grad)
        states = {k: v.clone().requires_grad_(True) for k, v in base.items()}
        out = distill_loss(states, teacher, labels, head, {1: 1.0, 2: 2.0, 3: 1.0}, chunk_size=3, mode=mode)
        out.total.backward()
        results[mode] = (out, {k: v.grad for k, v in states.items()}, head.weight.grad)
    ref_out, ref_grads, ref_w = results["plain"]
    for mode in ("checkpoint", "fused"):
        out, grads, w = results[mode]
        assert out.num_tokens == ref_out.num_tokens == int((labels[:, 1:] != -100).sum())
        torch.testing.assert_close(out.total, ref_out.total)
        for k in (1, 2, 3):
            torch.testing.assert_close(out.per_layer[k], ref_out.per_layer[k])
            torch.testing.assert_close(grads[k], ref_grads[k])
            assert grads[k][:, -1].abs().sum() == 0  # the last position predicts nothing
        assert (w is None) == (not weight_grad)
        if weight_grad:
            torch.testing.assert_close(w, ref_w)
    assert ref_grads[1].abs().sum() > 0


def test_fused_distill_hand_computed():
    """The hand computation of test_distill_loss_hand_computed, through the fused path with chunks of 1."""
    head = _head([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
    labels = torch.tensor([[-100, 0, 2]])
    teacher = torch.tensor([[[2.0, 0.0], [0.0, 1.0], [5.0, 5.0]]])
    s1 = torch.tensor([[[1.0, 0.0], [0.0, 0.0], [9.0, 9.0]]], requires_grad=True)
    out = distill_loss({1: s1}, teacher, labels, head, {1: 1.0}, chunk_size=1, mode="fused")
    t0, t1 = _softmax([2, 0, 0]), _softmax([0, 1, 0])
    l1 = (_kl(t0, _softmax([1, 0, 0])) + _kl(t1, _softmax([0, 0, 0]))) / 2
    assert out.per_layer[1].item() == pytest.approx(l1, abs=1e-6)
    out.total.backward()
    q = _softmax([1, 0, 0])
    torch.testing.assert_close(s1.grad[0, 0], torch.tensor([q[0] - t0[0], q[1] - t0[1]]) / 2)
    assert s1.grad[0, 2].abs().sum() == 0


def test_distill_loss_rejects_an_unknown_mode():
    head = _head([[1.0, 0.0], [0.0, 1.0]])
    s = torch.zeros(1, 3, 2)
    with pytest.raises(ValueError, match="loss mode must be one of"):
        distill_loss({1: s}, s, torch.tensor([[-100, 0, 1]]), head, {1: 1.0}, mode="bogus")
