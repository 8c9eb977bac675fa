"""The prompt bank's stacked encoders against the paper's module and torch's Adam, one unit at a time; a unit's
floats do not depend on its stack; a unit's slice moves between stacks exactly."""
import pytest
import torch

from ptuning.model.stacked import Layout, vectors
from ptuning.model.encoders import PromptEncoder
from ptuning.train.stack import EncoderStack, Settings

N_PSEUDO, HIDDEN = 9, 32


def encoders(kind: str, k: int, dropout: float = 0.0) -> list[PromptEncoder]:
    torch.manual_seed(0)
    return [PromptEncoder(N_PSEUDO, HIDDEN, kind, dropout) for _ in range(k)]


def stack_of(encs: list[PromptEncoder], settings: list[Settings] | None = None) -> EncoderStack:
    layout = Layout.of(encs[0].kind, N_PSEUDO, HIDDEN)
    settings = settings or [Settings(1e-3, 0.0, 0.0, i) for i in range(len(encs))]
    return EncoderStack(layout, [e.state_dict() for e in encs], settings, torch.device("cpu"))


def reference_with_mask(encoder: PromptEncoder, mask: torch.Tensor) -> torch.Tensor:
    """nn.LSTM(num_layers=2, dropout=p) in train mode, with a given mask: its two layers as one-layer LSTMs with
    the mask applied to the first layer's output (where nn.LSTM applies its dropout)."""
    layers = []
    for layer in range(2):
        one = torch.nn.LSTM(HIDDEN, HIDDEN // 2, bidirectional=True, batch_first=True)
        for name, _ in list(one.named_parameters()):
            setattr(one, name, getattr(encoder.lstm, name.replace("_l0", f"_l{layer}")))
        layers.append(one)
    x = encoder.embedding.weight.unsqueeze(0)
    x = layers[0](x)[0] * mask
    return encoder.mlp(layers[1](x)[0]).squeeze(0)


def assert_close_relative(a: torch.Tensor, b: torch.Tensor, tol: float) -> None:
    assert (a - b).abs().max() <= tol * max(b.abs().max().item(), 1e-30), ((a - b).abs().max().item())


@pytest.mark.parametrize("kind", ["lstm", "mlp", "none"])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_the_stack_equals_the_papers_module_per_unit_forward_and_backward(kind, dropout):
    encs = encoders(kind, 4, dropout)
    stack = stack_of(encs)
    grad = torch.randn(4, N_PSEUDO, HIDDEN)
    for training in (False, True):
        masks = None
        if training and dropout and kind == "lstm":
            masks = (torch.rand(4, N_PSEUDO, HIDDEN) >= dropout).float() / (1 - dropout)
            ours = vectors(stack.rows, stack.layout, masks)
            refs = [reference_with_mask(e, m) for e, m in zip(encs, masks)]
        else:  # eval mode: nn.LSTM's dropout is off, as the stack's is
            ours = stack(training=False)
            refs = [e.eval()() for e in encs]
        for k, ref in enumerate(refs):
            assert_close_relative(ours[k].detach(), ref.detach(), 1e-6)
        stack.rows.grad = None
        for e in encs:
            e.zero_grad()
        (ours * grad).sum().backward()
        (torch.stack(refs) * grad).sum().backward()
        for k, e in enumerate(encs):
            mine = stack.layout.unpack(stack.rows.grad[k])
            for name, p in e.named_parameters():
                assert_close_relative(mine[name], p.grad, 1e-6)


def test_the_handwritten_backward_passes_gradcheck_in_float64():
    for kind in ("lstm", "mlp"):
        layout = Layout.of(kind, 3, 4)
        rows = torch.randn(2, layout.size, dtype=torch.float64, requires_grad=True)
        mask = (torch.rand(2, 3, 4, dtype=torch.float64) > 0.3).double() / 0.7 if kind == "lstm" else None
        assert torch.autograd.gradcheck(lambda r: vectors(r, layout, mask), (rows,))


def test_adam_per_unit_equals_torch_adam_with_its_own_learning_rate_and_decay():
    encs = encoders("lstm", 3)
    settings = [Settings(lr, wd, 0.0, 0) for lr, wd in ((1e-3, 5e-4), (3e-3, 0.0), (1e-2, 1e-3))]
    stack = stack_of(encs, settings)
    refs = [torch.optim.Adam(e.parameters(), lr=s.lr, weight_decay=s.weight_decay) for e, s in zip(encs, settings)]
    gen = torch.Generator().manual_seed(1)
    for step in range(20):
        grads = torch.randn(3, N_PSEUDO, HIDDEN, generator=gen)
        stack.rows.grad = torch.empty_like(stack.rows)
        for k, (e, g) in enumerate(zip(encs, grads)):  # both optimizers get the same gradients
            (e() * g).sum().backward()
            stack.layout.pack({n: p.grad for n, p in e.named_parameters()}, stack.rows.grad[k])
        stack.step([0, 1, 2])
        stack.rows.grad = None
        for opt in refs:
            opt.step()
            opt.zero_grad()
        if step % 5 == 4:  # each unit's own ExponentialLR
            for i, (s, opt) in enumerate(zip(stack.settings, refs)):
                s.lr *= 0.9 - 0.1 * i
                opt.param_groups[0]["lr"] *= 0.9 - 0.1 * i
    for k, e in enumerate(encs):
        mine = stack.weights(k)
        for name, p in e.named_parameters():
            assert_close_relative(mine[name], p.detach(), 1e-6)
        state = stack.optimizer_state(k)
        assert state["step"] == 20 and state["lr"] == refs[k].param_groups[0]["lr"]


def test_a_units_floats_do_not_depend_on_its_stack():
    """Unit 0 alone and in a stack of 8 (and after others leave): the same vectors, gradients and steps, bit for
    bit, with dropout from its own generator."""
    encs = encoders("lstm", 8, 0.3)
    settings = [Settings(1e-3 * (i + 1), 5e-4, 0.3, 100 + i) for i in range(8)]
    alone, packed = stack_of(encs[:1], settings[:1]), stack_of(encs, settings)
    for step in range(4):
        for stack in (alone, packed):
            out = stack(training=True)
            (out * torch.linspace(-1, 1, out[0].numel()).view_as(out[0])).sum().backward()
        assert torch.equal(alone.rows.grad[0], packed.rows.grad[0])
        alone.step([0])
        packed.step(list(range(len(packed))))
        alone.rows.grad = packed.rows.grad = None
        if step == 1:  # units 3 and 5 stop early: the others move up, unchanged
            before = packed.rows.detach().clone()
            packed.remove(5)
            packed.remove(3)
            kept = [0, 1, 2, 4, 6, 7]
            assert torch.equal(packed.rows.detach(), before[kept])
        assert torch.equal(alone.rows.detach()[0], packed.rows.detach()[0])


def test_a_units_slice_moves_between_stacks_exactly():
    """A unit's weights, Adam state and dropout generator leave a stack of 8 and land in a stack of 3 unchanged."""
    encs = encoders("lstm", 8, 0.3)
    big = stack_of(encs, [Settings(1e-3, 5e-4, 0.3, i) for i in range(8)])
    for _ in range(3):
        big(training=True).sum().backward()
        big.step(list(range(8)))
        big.rows.grad = None
    small = stack_of(encoders("lstm", 3), [Settings(1e-3, 5e-4, 0.3, 50 + i) for i in range(3)])
    small.load_weights(1, big.weights(6))
    small.load_optimizer_state(1, big.optimizer_state(6))
    small.generators[1].set_state(big.generators[6].get_state())
    assert torch.equal(small.rows.detach()[1], big.rows.detach()[6])
    assert all(torch.equal(small.moments[i][1], big.moments[i][6]) for i in range(2))
    for stack, row in ((big, 6), (small, 1)):  # and the next step is the same
        stack(training=True).sum().backward()
        stack.step([row])
    assert torch.equal(small.rows.detach()[1], big.rows.detach()[6])


def test_a_checkpoint_of_torch_adam_from_before_the_bank_resumes():
    encoder = encoders("lstm", 1)[0]
    opt = torch.optim.Adam(encoder.parameters(), lr=1e-3)
    encoder().sum().backward()
    opt.step()
    stack = stack_of([encoder])
    stack.load_optimizer_state(0, opt.state_dict())
    moments = stack.optimizer_state(0)
    for name, p in encoder.named_parameters():
        assert torch.equal(moments["exp_avg"][name], opt.state[p]["exp_avg"])
    assert moments["step"] == 1


def test_a_row_leaves_while_a_graph_of_the_old_stack_is_alive():
    """A unit that stops leaves its stack even if something still holds an earlier step's graph: the next
    forward and backward see the smaller stack."""
    stack = stack_of(encoders("lstm", 3))
    kept = stack(training=True)  # a graph over 3 rows, still referenced
    stack.remove(1)
    stack(training=True).sum().backward()
    assert stack.rows.grad.shape == (2, stack.layout.size) and kept.shape[0] == 3
