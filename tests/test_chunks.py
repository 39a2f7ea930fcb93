"""Chunk-wise training along the sequence (SeCO / SpaCO), against full-sequence backprop.

The reference is always plain autograd on the whole sequence: K=1 with chunks must give its
gradient exactly (float64), K=2 with chunks the unchunked K=2 step's, SpaCO's expectation (every
keep pattern weighted by its probability) the exact gradient.
"""

from __future__ import annotations

import copy
import itertools
import math
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import localize
from localize.errors import ConfigError, PlanError
from localize.runtime import chunks
from localize.zoo import GPT, EncoderLayer

VOCAB = 13


class _sgd0(torch.optim.SGD):  # noqa: N801 - used like the optimizer factories it stands beside
    """SGD with lr 0 that leaves each parameter the gradient its step used (``seen_grad``): the step
    frees ``.grad`` once the update used it."""

    def __init__(self, params) -> None:
        super().__init__(params, lr=0.0)

    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                p.seen_grad = None if p.grad is None else p.grad.clone()
        return super().step(closure)


def _grads(model: nn.Module) -> list[torch.Tensor]:
    """Each parameter's gradient: of plain backward (``.grad``), else the one the last step used."""
    grads = [p.grad if p.grad is not None else getattr(p, "seen_grad", None) for p in model.parameters()]
    return [g.clone() if g is not None else torch.zeros_like(p) for g, p in zip(grads, model.parameters())]


def _backprop_grads(model: nn.Module, ids: torch.Tensor, target: torch.Tensor) -> list[torch.Tensor]:
    model.zero_grad()
    logits = model(ids)
    F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1)).backward()
    return _grads(model)


def _assert_close(got: list[torch.Tensor], want: list[torch.Tensor], tol: float = 1e-10) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert torch.allclose(g, w, atol=tol, rtol=0), float((g - w).abs().max())


class LSTMLM(nn.Module):
    def __init__(self, kind: type = nn.LSTM) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 8)
        self.rnn = kind(8, 12, num_layers=2, batch_first=True)
        self.head = nn.Linear(12, VOCAB)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(self.embed(ids))
        return self.head(out)


class CausalConvLM(nn.Module):
    """Left-padded convolutions and a running mean (cumsum over arange-derived counts)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 8)
        self.conv1 = nn.Conv1d(8, 8, 3)
        self.conv2 = nn.Conv1d(8, 8, 2, dilation=2)
        self.head = nn.Linear(16, VOCAB)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids).transpose(1, 2)  # (B, C, T): the sequence is dim -1 here
        x = torch.relu(self.conv1(F.pad(x, (2, 0))))
        x = torch.relu(self.conv2(F.pad(x, (2, 0)))).transpose(1, 2)
        count = torch.arange(ids.size(1), device=ids.device) + 1
        mean = x.cumsum(1) / count[:, None]
        return self.head(torch.cat([x, mean], dim=-1))


class HandAttention(nn.Module):
    """nanoGPT-style attention written as ops, with rotary positions and attention dropout."""

    def __init__(self, dim: int = 16, heads: int = 2, dropout: float = 0.0) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.drop = nn.Dropout(dropout)
        self.register_buffer("bias", torch.ones(64, 64).tril().view(1, 1, 64, 64))
        self.register_buffer("inv_freq", 1.0 / 10000 ** (torch.arange(0, self.head_dim, 2).float() / self.head_dim))

    def rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        a, b = x[..., : self.head_dim // 2], x[..., self.head_dim // 2 :]
        return torch.cat([a * cos - b * sin, a * sin + b * cos], dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.size()
        q, k, v = self.qkv(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.heads, self.head_dim).transpose(1, 2) for t in (q, k, v))
        freqs = torch.arange(T, device=x.device).to(x.dtype)[:, None] * self.inv_freq.to(x.dtype)[None, :]
        q, k = self.rotate(q, freqs.cos(), freqs.sin()), self.rotate(k, freqs.cos(), freqs.sin())
        att = (q @ k.transpose(-2, -1)) * (1.0 / self.head_dim**0.5)
        att = att.masked_fill(self.bias[:, :, :T, :T] == 0, float("-inf"))
        att = self.drop(F.softmax(att, dim=-1))
        y = (att @ v).transpose(1, 2).contiguous().view(B, T, C)
        return self.proj(y)


class HandGPT(nn.Module):
    def __init__(self, dropout: float = 0.0) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 16)
        self.layers = nn.ModuleList(HandAttention(dropout=dropout) for _ in range(2))
        self.norm = nn.LayerNorm(16)
        self.head = nn.Linear(16, VOCAB)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        for layer in self.layers:
            x = x + layer(x)
        return self.head(self.norm(x))


def _data(batch: int = 2, length: int = 11, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, length), generator=g), torch.randint(0, VOCAB, (batch, length), generator=g)


MODELS = {
    "gpt": lambda: GPT(vocab_size=VOCAB, block_size=32, dim=16, depth=2, heads=2),
    "lstm": lambda: LSTMLM(nn.LSTM),
    "gru": lambda: LSTMLM(nn.GRU),
    "conv": CausalConvLM,
    "hand": HandGPT,  # torch.export (fx cannot slice by x.size()), hand-written attention, rotary
    "deep": lambda: GPT(vocab_size=VOCAB, block_size=32, dim=16, depth=4, heads=2),
}


@pytest.mark.parametrize("name", sorted(set(MODELS) - {"deep"}))
@pytest.mark.parametrize("chunk", [1, 4, 11, 20])
def test_k1_chunks_equal_full_sequence_backprop(name: str, chunk: int) -> None:
    torch.manual_seed(0)
    model = MODELS[name]().double()
    ref = copy.deepcopy(model)
    ids, target = _data()
    lm = localize.transform(model, blocks=1, example_inputs=(ids,), optimizer=_sgd0, chunk_size=chunk)
    (loss,) = lm.train_step(ids, target)
    want = _backprop_grads(ref, ids, target)
    _assert_close(_grads(model), want)
    full = F.cross_entropy(ref(ids).reshape(-1, VOCAB), target.reshape(-1))
    assert loss == pytest.approx(float(full.detach()), rel=1e-12)
    with torch.no_grad():  # inference is the original model's
        assert torch.equal(lm(ids), model(ids))


def test_the_last_chunk_is_not_recomputed() -> None:
    """The reverse walk starts with the chunk the forward just ran: its graph is kept, so a step of
    n chunks runs the chunk program 2n - 1 times, not 2n (and the gradient stays exact, above)."""
    torch.manual_seed(0)
    ids, target = _data(length=11)
    lm = localize.transform(MODELS["gpt"](), blocks=1, example_inputs=(ids,), optimizer=_sgd0, chunk_size=4)
    calls = []
    lm.chunk_programs[0].register_forward_hook(lambda m, args, out: calls.append(torch.is_grad_enabled()))
    lm.train_step(ids, target)
    assert calls == [False, False, True, True, True]  # F: chunks 0, 1 without a graph, 2 with; L: 1, 0
    # SpaCO may drop the last chunk, the largest (it attends to every key): its forward keeps no graph
    spaco = localize.transform(MODELS["gpt"](), blocks=1, example_inputs=(ids,), optimizer=_sgd0, chunk_size=4,
                               chunk_keep=0.5)
    calls.clear()
    spaco.chunk_programs[0].register_forward_hook(lambda m, args, out: calls.append(torch.is_grad_enabled()))
    spaco.train_step(ids, target)
    assert calls[:3] == [False, False, False] and all(calls[3:])


def test_ignore_index_is_respected_across_chunks() -> None:
    torch.manual_seed(1)
    model = MODELS["gpt"]().double()
    ref = copy.deepcopy(model)
    ids, target = _data(length=12)
    target[0, :7] = -100  # the first chunks of one row count nothing
    target[1, 10] = -100
    lm = localize.transform(model, blocks=1, example_inputs=(ids,), optimizer=_sgd0, chunk_size=3)
    lm.train_step(ids, target)
    _assert_close(_grads(model), _backprop_grads(ref, ids, target))


@pytest.mark.parametrize(
    ("aux", "name", "blocks"),
    [("linear", "gpt", 2), ("dgl", "gpt", 2), ("readout", "gpt", 2), ("auglocal", "gpt", 2), ("man", "gpt", 2),
     ("readout", "deep", 3), ("readout", "hand", 2)],
)
def test_chunked_blocks_equal_unchunked_local_learning(aux: str, name: str, blocks: int) -> None:
    """Each block's chunked local gradient (its aux loss too) equals the unchunked step's. Heads that
    score each position alone (linear, dgl) run per chunk; heads that copy later layers (readout,
    auglocal, man: attention) run as their own chunk programs, carrying keys and values."""
    ids, target = _data(length=10)
    target[1, 4] = -100
    torch.manual_seed(2)
    model = MODELS[name]().double()
    twin = copy.deepcopy(model)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # heads too: man's copies the model's buffers, its own are new
    try:
        torch.manual_seed(3)
        plain = localize.transform(twin, blocks=blocks, example_inputs=(ids,), aux=aux, optimizer=_sgd0)
        torch.manual_seed(3)
        chunked = localize.transform(model, blocks=blocks, example_inputs=(ids,), aux=aux, optimizer=_sgd0,
                                     chunk_size=3)
    finally:
        torch.set_default_dtype(default)
    mixing = aux in ("readout", "auglocal", "man")
    assert [p is not None for p in chunked.head_chunk_programs] == [mixing] * (blocks - 1) + [False]
    chunked.aux.load_state_dict(plain.aux.state_dict())
    for _ in range(2):  # the second step runs on the first's update: the head's layers are the trained ones
        assert chunked.train_step(ids, target) == pytest.approx(plain.train_step(ids, target), rel=1e-12)
        _assert_close(_grads(model), _grads(twin))
        _assert_close(_grads(chunked.aux), _grads(plain.aux))
        assert all(g.abs().sum() > 0 for g in _grads(chunked.aux))  # the head program trains the head's own layers


def test_a_following_head_program_reads_the_heads_buffers_after_a_move() -> None:
    """readout with follow=True on an exported graph: the head program reads the head's EMA buffers by
    get_attr; after a buffer-replacing move (as .to(device) does) it still reads the head's, updated
    every step, so the chunked step keeps ending where the unchunked one ends."""
    ids, target = _data(length=10)
    torch.manual_seed(2)
    model = MODELS["hand"]()
    twin = copy.deepcopy(model)
    opts = {"follow": True, "momentum": 0.5}
    plain = localize.transform(twin, blocks=2, example_inputs=(ids,), aux="readout", aux_options=opts,
                               optimizer="sgd", lr=0.1)
    chunked = localize.transform(model, blocks=2, example_inputs=(ids,), aux="readout", aux_options=opts,
                                 optimizer="sgd", lr=0.1, chunk_size=3)
    assert chunked.plan.traced.method == "export" and chunked.head_chunk_programs[0] is not None
    chunked.aux.load_state_dict(plain.aux.state_dict())
    for lm in (plain, chunked):
        lm._apply(lambda t: t.clone())  # new buffer objects, parameters moved in place
    for _ in range(3):
        assert chunked.train_step(ids, target) == pytest.approx(plain.train_step(ids, target), rel=1e-5)
    _assert_close(list(model.parameters()), list(twin.parameters()), 1e-5)


def test_a_head_program_follows_train_and_eval() -> None:
    """A readout head copies layers with attention dropout: its chunk program drops in train() and
    not in eval(), like the head (the dropout flag is bound per program, as in blocks)."""
    ids, target = _data(length=8)
    torch.manual_seed(5)
    lm = localize.transform(HandGPT(dropout=0.3), blocks=2, example_inputs=(ids,), aux="readout", chunk_size=3)
    program = lm.head_chunk_programs[0]
    feature = torch.randn(2, 3, 16)
    empty = (None,) * len(program.chunk_spec.states)
    lm.eval()
    assert torch.equal(program(0, empty, feature)[0][0], program(0, empty, feature)[0][0])
    assert torch.allclose(program(0, empty, feature)[0][0], lm.aux["0"](feature), atol=1e-6)
    lm.train()
    assert not torch.equal(program(0, empty, feature)[0][0], program(0, empty, feature)[0][0])
    (loss, _) = lm.train_step(ids, target)
    assert math.isfinite(loss)


def test_spaco_expected_gradient_is_exact(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every keep pattern of 3 chunks, weighted by its probability, averages to the exact gradient."""
    p = 0.4
    ids, target = _data(length=9)
    torch.manual_seed(4)
    base = MODELS["gpt"]().double()
    want = _backprop_grads(copy.deepcopy(base), ids, target)
    expected = [torch.zeros_like(w) for w in want]
    for mask in itertools.product([True, False], repeat=3):
        model = copy.deepcopy(base)
        lm = localize.transform(model, blocks=1, example_inputs=(ids,), optimizer=_sgd0, chunk_size=3, chunk_keep=p)
        monkeypatch.setattr(chunks, "keep_mask", lambda n, keep, mask=mask: list(mask))
        lm.train_step(ids, target)
        prob = 1.0
        for kept in mask:
            prob *= p if kept else 1 - p
        for e, g in zip(expected, _grads(model)):
            e += prob * g
    _assert_close(expected, want)
    # and a single draw is not the exact gradient: SpaCO does skip work
    monkeypatch.setattr(chunks, "keep_mask", lambda n, keep: [False, True, False])
    model = copy.deepcopy(base)
    localize.transform(model, blocks=1, example_inputs=(ids,), optimizer=_sgd0, chunk_size=3, chunk_keep=p).train_step(
        ids, target
    )
    assert not all(torch.allclose(g, w) for g, w in zip(_grads(model), want))


def test_spaco_estimates_average_to_the_exact_gradient() -> None:
    """Many SpaCO draws (keep 0.5, 4 chunks): their mean approaches the exact gradient, as it must."""
    ids, target = _data(length=12)
    torch.manual_seed(11)
    model = MODELS["gpt"]().double()
    want = torch.cat([g.flatten() for g in _backprop_grads(copy.deepcopy(model), ids, target)])
    lm = localize.transform(model, blocks=1, example_inputs=(ids,), optimizer=_sgd0, chunk_size=3, chunk_keep=0.5)
    torch.manual_seed(12)
    draws = []
    for _ in range(400):
        lm.train_step(ids, target)
        draws.append(torch.cat([g.flatten() for g in _grads(model)]))
    error = [float((torch.stack(draws[:n]).mean(0) - want).norm() / want.norm()) for n in (10, 400)]
    assert error[1] < 0.1 and error[1] < error[0] / 3, error


class DropoutLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gpt = GPT(vocab_size=VOCAB, block_size=32, dim=16, depth=1, heads=2)
        self.drop = nn.Dropout(0.5)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.gpt.lm_head(self.drop(self.gpt.norm(self.gpt.layers[0](self.gpt.tok_embed(ids)))))


@pytest.mark.parametrize("make", [DropoutLM, lambda: HandGPT(dropout=0.3)], ids=["dropout", "attention-dropout"])
def test_dropout_replays_in_the_recomputed_chunks(make) -> None:
    """With dropout (a layer's, or attention's), the backward recomputation sees the forward's masks: the
    gradient equals autograd through one graph of the same chunks drawn in the same order."""
    ids, target = _data(length=8)
    torch.manual_seed(5)
    model = make().double()
    twin = copy.deepcopy(model)
    lm = localize.transform(model, blocks=1, example_inputs=(ids,), optimizer=_sgd0, chunk_size=3)
    program = localize.transform(
        twin, blocks=1, example_inputs=(ids,), optimizer=_sgd0, chunk_size=3
    ).chunk_programs[0]
    lm.train()
    program.train()
    empty = (None,) * len(program.chunk_spec.states)
    assert not torch.equal(program(0, empty, ids[:, :3])[0][0], program(0, empty, ids[:, :3])[0][0])  # it drops
    torch.manual_seed(6)
    lm.train_step(ids, target)
    torch.manual_seed(6)
    spec, states, loss = program.chunk_spec, [], 0.0
    for c, start in enumerate(range(0, 8, 3)):
        carried = chunks._carried(spec, states, c)
        (out,), own = program(start, carried, ids[:, start : start + 3])
        states.append(list(own))
        loss = loss + F.cross_entropy(out.reshape(-1, VOCAB), target[:, start : start + 3].reshape(-1), reduction="sum")
    (loss / target.numel()).backward()
    _assert_close(_grads(model), _grads(twin))


def test_training_options_compose_with_chunks() -> None:
    """accumulate=2 with chunks equals one step on the joined batch; bf16 autocast runs and learns."""
    ids, target = _data(batch=4, length=8)
    torch.manual_seed(7)
    model = MODELS["gpt"]().double()
    twin = copy.deepcopy(model)
    acc = localize.transform(
        model, blocks=2, example_inputs=(ids,), aux="linear", optimizer=_sgd0, chunk_size=3, accumulate=2
    ).double()
    one = localize.transform(
        twin, blocks=2, example_inputs=(ids,), aux="linear", optimizer=_sgd0, chunk_size=5
    ).double()
    one.aux.load_state_dict(acc.aux.state_dict())
    acc.train_step(ids[:2], target[:2])
    acc.train_step(ids[2:], target[2:])
    one.train_step(ids, target)
    _assert_close(_grads(model), _grads(twin))
    torch.manual_seed(8)
    lm = localize.transform(MODELS["gpt"](), blocks=2, example_inputs=(ids,), aux="linear", lr=3e-3, chunk_size=3,
                            autocast="bf16")
    first = lm.train_step(ids, target)
    for _ in range(30):
        last = lm.train_step(ids, target)
    assert last[-1] < first[-1]


def test_step_program_shows_the_chunk_ops() -> None:
    ids, _ = _data()
    lm = localize.transform(MODELS["gpt"](), blocks=2, example_inputs=(ids,), aux="linear", chunk_size=4)
    code = lm.step_program.code
    assert "chunk_forward(state, 0, chunk_0, 4, idx, keep_last = True)" in code and "chunk_backward(state, 1, chunk_1" in code
    assert [p.chunk_spec.states for p in lm.chunk_programs] == [("append", "append"), ("append", "append")]


# ------------------------------------------------------------------------------------------ refusals


class Pooled(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 8)
        self.head = nn.Linear(8, VOCAB)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        return self.head(x - x.mean(1, keepdim=True))


class Centred(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 8)
        self.conv = nn.Conv1d(8, VOCAB, 3, padding=1)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.conv(self.embed(ids).transpose(1, 2)).transpose(1, 2)


class Bidirectional(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 8)
        self.layer = EncoderLayer(8, 2)
        self.head = nn.Linear(8, VOCAB)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.layer(self.embed(ids)))


class ExplicitScores(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 8)
        self.head = nn.Linear(8, VOCAB)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        scores = (x @ x.transpose(1, 2)).softmax(-1)
        return self.head(scores @ x)


class ShiftLeft(nn.Module):
    """Reads the next position: position-shaped, but not causal."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 8)
        self.head = nn.Linear(8, VOCAB)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(ids).roll(-1, dims=1))


class BatchNormed(nn.Module):
    """Position-wise in eval() (running statistics), which the probes run in; in train() its
    statistics average every position, so a chunk's output differs from the full sequence's."""

    def __init__(self, functional: bool = False) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 8)
        self.norm = nn.BatchNorm1d(8)
        self.head = nn.Linear(8, VOCAB)
        self.functional = functional

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids).transpose(1, 2)
        if self.functional:
            x = F.batch_norm(x, self.norm.running_mean, self.norm.running_var, training=self.training)
        else:
            x = self.norm(x)
        return self.head(x.transpose(1, 2))


def test_batch_norm_over_the_sequence_is_refused() -> None:
    """In train() the chunk's statistics are not the sequence's: chunked != full (shown), so refused."""
    ids, _ = _data()
    net = BatchNormed().train()
    full = net(ids)[:, :4]
    assert not torch.allclose(net(ids[:, :4]), full)  # what a chunk of 4 would compute instead
    for functional in (False, True):
        with pytest.raises(PlanError, match=r"is batch norm: in train\(\) it normalises with statistics over every"):
            localize.transform(BatchNormed(functional), blocks=1, example_inputs=(ids,), chunk_size=4)


@pytest.mark.parametrize(
    "model, words",
    [
        (Pooled(), "reduces over the sequence"),
        (Centred(), "reads later positions"),
        (Bidirectional(), "bidirectional attention"),
        (ExplicitScores(), "2 sequence dims"),
        (ShiftLeft(), "reads later positions"),
    ],
)
def test_non_causal_models_are_refused_naming_the_op(model: nn.Module, words: str) -> None:
    ids, _ = _data()
    with pytest.raises(PlanError, match=words):
        localize.transform(model, blocks=1, example_inputs=(ids,), chunk_size=4)


def test_bidirectional_rnn_is_refused() -> None:
    model = LSTMLM()
    model.rnn = nn.LSTM(8, 6, batch_first=True, bidirectional=True)
    model.head = nn.Linear(12, VOCAB)
    with pytest.raises(PlanError, match="rnn .LSTM. is bidirectional"):
        localize.transform(model, blocks=1, example_inputs=(_data()[0],), chunk_size=4)


def test_bad_chunk_options_and_heads_are_refused() -> None:
    ids, _ = _data()
    gpt = MODELS["gpt"]()
    for kwargs, words in [
        ({"chunk_size": 0}, "chunk_size must be an int >= 1"),
        ({"chunk_size": 4, "chunk_keep": 0.0}, "chunk_keep must be a number in"),
        ({"chunk_size": 4, "seq_dim": "1"}, "seq_dim must be an int"),
    ]:
        with pytest.raises(ConfigError, match=words):
            localize.transform(gpt, blocks=2, example_inputs=(ids,), **kwargs)
    with pytest.raises(ConfigError, match="needs example_inputs"):
        localize.transform(gpt, blocks=2, chunk_size=4)
    with pytest.raises(ConfigError, match="computes its own loss over the whole input"):
        localize.transform(gpt, blocks=2, example_inputs=(ids,), aux="infopro", chunk_size=4)


def test_every_strategy_either_chunks_or_is_refused_naming_ones_that_do() -> None:
    """On a GPT, heads that score each position on their own chunk, and so do heads that copy later
    layers (their attention carries its keys and values); heads that compute their own loss over the
    whole input are refused in one line that names only strategies which chunk on this model."""
    from localize.aux import available

    ids, _ = _data()
    works, refused = [], {}
    for aux in available():
        try:
            localize.transform(MODELS["gpt"](), blocks=2, example_inputs=(ids,), aux=aux, chunk_size=4)
            works.append(aux)
        except ConfigError as e:
            refused[aux] = str(e)
    assert works == ["auglocal", "dgl", "linear", "man", "readout"]
    assert set(refused) == {"drtp", "featrecon", "infopro"}
    for message in refused.values():
        assert "computes its own loss over the whole input" in message, message
        assert "\n" not in message
        named = set(re.findall(r"'(\w+)'", message.split("chunk_size=")[-1]))
        assert named == {"readout", "dgl", "linear"} and named <= set(works), message


def test_heads_on_channels_first_features_are_refused_with_advice_that_works() -> None:
    """A causal conv LM's features are (batch, channels, positions): every head pools over positions,
    so no strategy chunks at K=2, and the refusal names none but says what does work (blocks=1)."""
    from localize.aux import available

    ids, _ = _data()
    built = []
    for aux in available():
        try:  # without chunks: some strategies do not apply to this model at all (auglocal: no repeated layers)
            localize.transform(MODELS["conv"](), blocks=2, example_inputs=(ids,), aux=aux)
        except ConfigError:
            continue
        built.append(aux)
        with pytest.raises(ConfigError, match=r"no strategy's head scores each position .* blocks=1") as raised:
            localize.transform(MODELS["conv"](), blocks=2, example_inputs=(ids,), aux=aux, chunk_size=4)
        assert "aux='" not in str(raised.value).split("chunk_size=")[-1]
    assert {"dgl", "linear"} <= set(built)
    localize.transform(MODELS["conv"](), blocks=1, example_inputs=(ids,), chunk_size=4)  # the advice holds


# ------------------------------------------------------------------------------------ Hugging Face


def _hf(name: str) -> nn.Module:
    transformers = pytest.importorskip("transformers")
    if name == "llama":  # rotary positions, grouped-query attention, an exported causal mask
        config = transformers.LlamaConfig(
            vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64,
        )
        return transformers.LlamaForCausalLM(config)
    config = transformers.GPT2Config(  # learned positions
        vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2, n_positions=64, bos_token_id=0, eos_token_id=0,
        attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0,
    )
    return transformers.GPT2LMHeadModel(config)


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(ids).logits


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_hugging_face_causal_lms_chunk_exactly(name: str) -> None:
    """torch.export graphs (the sequence kept dynamic): K=1 chunks give full-sequence backprop's gradient,
    K=2 chunks the unchunked K=2 step's; the model's own causal mask is recognised and replaced."""
    ids, target = _data(length=12)
    torch.manual_seed(9)
    model = _hf(name).double()
    ref, twin = copy.deepcopy(model), copy.deepcopy(model)
    lm = localize.transform(model, blocks=1, example_inputs=(ids,), optimizer=_sgd0, chunk_size=5)
    assert lm.plan.traced.method == "export"
    lm.train_step(ids, target)
    F.cross_entropy(_logits(ref, ids).reshape(-1, VOCAB), target.reshape(-1)).backward()
    _assert_close(_grads(model), _grads(ref))
    torch.manual_seed(10)
    plain = localize.transform(ref, blocks=2, example_inputs=(ids,), aux="linear", optimizer=_sgd0).double()
    torch.manual_seed(10)
    chunked = localize.transform(twin, blocks=2, example_inputs=(ids,), aux="linear", optimizer=_sgd0,
                                 chunk_size=5).double()
    chunked.aux.load_state_dict(plain.aux.state_dict())
    assert chunked.train_step(ids, target) == pytest.approx(plain.train_step(ids, target), rel=1e-12)
    _assert_close(_grads(twin), _grads(ref))


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_readout_heads_of_hugging_face_lms_chunk_exactly(name: str) -> None:
    """K=2 with readout heads on exported graphs: the head is the unchunked transform's (the model's own
    final norm and LM head, whose sizes the dynamic graph reads from the input ids), GPT-2's copied
    layer runs as a head program, and the chunked step's gradients are the unchunked step's."""
    ids, target = _data(length=12)
    torch.manual_seed(9)
    model = _hf(name).double()
    twin = copy.deepcopy(model)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        plain = localize.transform(twin, blocks=2, example_inputs=(ids,), aux="readout", optimizer=_sgd0)
        chunked = localize.transform(model, blocks=2, example_inputs=(ids,), aux="readout", optimizer=_sgd0,
                                     chunk_size=5)
    finally:
        torch.set_default_dtype(default)
    assert chunked.aux.state_dict().keys() == plain.aux.state_dict().keys()
    assert (chunked.head_chunk_programs[0] is not None) == (name == "gpt2")  # llama's layers need their rotary inputs
    chunked.aux.load_state_dict(plain.aux.state_dict())
    assert chunked.train_step(ids, target) == pytest.approx(plain.train_step(ids, target), rel=1e-12)
    _assert_close(_grads(model), _grads(twin))
    _assert_close(_grads(chunked.aux), _grads(plain.aux))


def test_a_padding_mask_is_refused() -> None:
    ids, _ = _data(length=12)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    with pytest.raises(PlanError, match=r"2 sequence dims .*\(a mask read from the inputs, e.g. padding\)"):
        localize.transform(_hf("llama"), blocks=1, example_inputs=(ids, mask), chunk_size=4)


# ------------------------------------------------------------------------------------------ CLI


def test_cli_refuses_bad_chunk_flags_in_one_line(capsys: pytest.CaptureFixture, tmp_path) -> None:
    from pathlib import Path

    from localize.cli.main import main

    examples = Path(__file__).resolve().parents[1] / "examples"
    for argv, words in [
        ([str(examples / "charlm_gpt.py"), "--chunk-keep", "1.5"], "--chunk-keep: 1.5 is out of range"),
        ([str(examples / "mnist1d_resnet.py"), "--chunk-size", "8"], "seq_dim= naming the dimension"),
    ]:
        assert main([*argv, "--out", str(tmp_path / "out"), "--no-onnx"]) == 2
        err = capsys.readouterr().err.strip()
        assert words in err and len(err.splitlines()) == 1, err


def test_chunked_stages_split_per_block_and_replicas_average_by_hand() -> None:
    """Under --distributed each stage runs its block's chunk ops (SeCO within the stage); with
    replicas the stage agrees on the loss before chunk_backward and averages the gradients after it
    (DDP's reducer cannot follow one backward per chunk)."""
    from pathlib import Path

    from localize.distributed.launch import load_local_model
    from localize.distributed.stages import split_step

    spec = str(Path(__file__).resolve().parents[1] / "examples" / "charlm_gpt.py")
    lm, _ = load_local_model(spec, 2, chunk_size=8)
    stages = split_step(lm)
    for s in stages:
        code = s.program.code
        assert f"chunk_forward(state, {s.stage}," in code and f"chunk_backward(state, {s.stage}," in code
        assert f"chunk_forward(state, {1 - s.stage}," not in code and "agree" not in code
    assert stages[0].sends == ["target", *stages[1].receives[1:]] and len(stages[0].sends) == 2
    for s in split_step(lm, replicas=2):
        lines = [line.strip() for line in s.program.code.splitlines()]
        order = [next(i for i, line in enumerate(lines) if f"{op}(" in line)
                 for op in ("chunk_loss", "agree_value", "chunk_backward", "average_gradients", "check_loss")]
        assert order == sorted(order), s.program.code
        assert f"chunk_backward(state, {s.stage}, chunk_{s.stage}" in lines[order[2]] and f"agreed_{s.stage}" in lines[order[2]]


def test_chunk_doctests() -> None:
    import doctest

    from localize.passes import chunk_sequence, find_sequence_ops, match_attention

    for module in (find_sequence_ops, chunk_sequence, match_attention):
        result = doctest.testmod(module)
        assert result.failed == 0 and result.attempted > 0, module.__name__
