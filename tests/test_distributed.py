"""Blocks on separate processes: pipelines of 2 and 4 CPU ranks (gloo) train exactly what the
in-process schedule trains, replicas average like one big batch, a dead or hung rank stops the
others with one clear line, and bad launches fail in one line.

Ranks are real processes with one thread each: forked from a fork server that imported torch and
localize once (``ranks.Rank``, which saves seconds per rank) running ``python -m localize.distributed``'s
``main``, and once launched cold by torchrun. The in-process reference runs the same batches through
``LocalModel.train_step``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from program_helpers import write_program
from ranks import assert_same_state, free_port, launch, launch_module, rank_env, reference, wait_all

import localize
from localize.aux import available
from localize.data import epoch_batches
from localize.distributed import iter_batches, load_checkpoint, load_local_model, model_state_dict
from localize.distributed.checkpoint import read_keys
from localize.distributed.stages import Layout, split_step
from localize.distributed.wire import flatten_values, one_line, unflatten_values
from localize.runtime.ops import NonFiniteLossError, StepState, run_step

# A model whose later blocks read values block 0 makes: the mask (a model input) and an int size.
MASKED = """
import torch
from torch import nn

class Masked(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(6, 16)
        self.layers = nn.ModuleList(nn.Linear(16, 16) for _ in range(3))
        self.head = nn.Linear(16, 5)

    def forward(self, x, mask):
        n = x.size(1)
        h = self.embed(x)
        for layer in self.layers:
            h = torch.relu(layer(h)) * mask
        return self.head(h.sum(1) / n)

def model():
    return Masked()

def example_inputs():
    return (torch.randn(4, 7, 6), torch.ones(4, 7, 1))

def dataset():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(45, 7, 6, generator=g)
    mask = (torch.rand(45, 7, 1, generator=g) > 0.3).float()
    y = torch.randint(0, 5, (45,), generator=g)
    return ((x, mask), y), ((x, mask), y)
"""

MLP = """
import torch
from localize.zoo import MLP

def model():
    return MLP(16, 32, 4, 5)

def example_inputs():
    return (torch.randn(4, 16),)

def dataset():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(60, 16, generator=g)
    y = torch.randint(0, 5, (60,), generator=g)
    return (x, y), (x, y)
"""

# A causal character model for chunks along the sequence under a pipeline.
GPT = """
import torch
from localize.zoo import GPT

def model():
    return GPT(vocab_size=16, block_size=16, dim=16, depth=2, heads=2)

def example_inputs():
    return (torch.randint(0, 16, (2, 16)),)

def dataset():
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 16, (24, 16), generator=g)
    y = torch.randint(0, 16, (24, 16), generator=g)
    return (x, y), (x, y)
"""

# Residual units whose linear layers note in $MARKER each call made during a backward pass (what
# recomputation does; torch.utils.checkpoint tells backward apart the same way).
COUNTED = """
import os, torch
from torch import nn

class Unit(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 16)

    def forward(self, x):
        return x + torch.tanh(self.fc(x))

def _count(module, args, out):
    if "MARKER" in os.environ and torch._C._current_graph_task_id() != -1:
        with open(os.environ["MARKER"], "a") as f:
            f.write("call\\n")

def model():
    net = nn.Sequential(nn.Linear(16, 16), *[Unit() for _ in range(4)], nn.Linear(16, 5))
    for unit in net[1:5]:
        unit.fc.register_forward_hook(_count)
    return net

def example_inputs():
    return (torch.randn(4, 16),)

def dataset():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(24, 16, generator=g)
    y = torch.randint(0, 5, (24,), generator=g)
    return (x, y), (x, y)
"""

# Streams (practically) forever; touches $MARKER once training is under way.
STREAM = """
import os, pathlib, torch
from localize.zoo import MLP

def model():
    return MLP(16, 32, 4, 5)

def example_inputs():
    return (torch.randn(4, 16),)

class Stream:
    def __iter__(self):
        g = torch.Generator().manual_seed(1)
        for i in range(10**7):
            if i == 10:
                pathlib.Path(os.environ["MARKER"]).touch()
            yield torch.randn(8, 16, generator=g), torch.randint(0, 5, (8,), generator=g)

def dataset():
    return Stream(), Stream()
"""


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    out = {}
    for name, text in {"masked": MASKED, "mlp": MLP, "stream": STREAM, "gpt": GPT, "counted": COUNTED}.items():
        out[name] = root / f"{name}.py"
        out[name].write_text(text)
    load_local_model(str(out["mlp"]), 2)  # warm up this process for the in-process references
    return out


# ----------------------------------------------------------------------------------------------- no processes


def test_split_step_forwards_values_to_the_blocks_that_read_them(files):
    lm, _ = load_local_model(str(files["masked"]), 4)
    stages = split_step(lm)
    step_nodes = {n.name: n for n in lm.step_program.graph.nodes}
    for s in stages:  # one block per stage; every other node is the step graph's own node
        calls = [n for n in s.program.graph.nodes if n.op == "call_module" and n.target.startswith("block_")]
        assert [n.target for n in calls] == [f"block_{s.stage}"]
    cuts = [[v for v in s.sends if step_nodes[v].op == "call_method" and step_nodes[v].target == "detach"] for s in stages]
    assert all(len(c) == 1 for c in cuts[:-1]) and stages[-1].sends == []  # one activation per boundary
    forwarded = [set(s.sends) - set(c) for s, c in zip(stages[:-1], cuts)]
    # the mask (a model input) and block 0's int size travel through every stage to the blocks reading them
    assert forwarded[0] == forwarded[1] == forwarded[2] and len(forwarded[0]) == 3 and {"mask", "target"} < forwarded[0]
    assert stages[0].sends[0] == "target" and stages[1].receives == stages[0].sends
    code = stages[1].program.code
    assert "localize_distributed_ops_recv(state)" in code and "localize_distributed_ops_send(state" in code
    assert "agree_loss" not in code and "agree_loss(state, 1, loss_1)" in split_step(lm, replicas=2)[1].program.code


def test_messages_flatten_and_rebuild_nested_values():
    values = [torch.ones(2, 3), (torch.zeros(1), 7, torch.Size([2, 2])), {"a": torch.arange(3), "b": None}]
    tensors: list[torch.Tensor] = []
    spec = flatten_values(values, tensors)
    assert len(tensors) == 3
    back = unflatten_values(spec, iter([t.clone() for t in tensors]))
    assert back[1][1:] == (7, torch.Size([2, 2])) and back[2]["b"] is None
    torch.testing.assert_close(back[2]["a"], torch.arange(3))
    line = one_line(
        RuntimeError(
            "[/x/gloo/transport/tcp/pair.cc:537] Read error: Connection reset by peer. "
            "This is typically caused by a remote worker hanging"
        )
    )
    assert line == "Read error: Connection reset by peer"


def test_world_size_must_be_a_multiple_of_the_blocks():
    assert Layout.of(4, 2).grid() == "stage 0: ranks 0, 2 | stage 1: ranks 1, 3"
    with pytest.raises(localize.LocalizeError, match=r"world size 3 is not a multiple of the 2 blocks") as e:
        Layout.of(3, 2)
    assert "\n" not in str(e.value)


def test_train_without_a_launcher_or_with_a_cross_block_head_explains(monkeypatch, files):
    from localize.distributed import train

    for var in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    lm, mf = load_local_model(str(files["mlp"]), 2)
    with pytest.raises(localize.LocalizeError, match=r"no process group .* torchrun --nproc-per-node 2"):
        train(lm, mf.dataset()[0], batch_size=8)
    from localize.zoo import ResNet1d

    net = ResNet1d(1, 10, widths=(8, 16), blocks_per_stage=(2, 2))
    man = localize.transform(net, blocks=2, example_inputs=(torch.randn(2, 1, 40),), aux="man")
    with pytest.raises(
        localize.LocalizeError, match=r"block 0's aux head reads parameters that another block trains"
    ):
        train(man, None)


# ----------------------------------------------------------------------------------------------- pipelines


def test_cli_under_torchrun_equals_the_in_process_schedule(files, tmp_path):
    """`torchrun --nproc-per-node 2 -m localize MODEL.py --blocks 2 --train --distributed`, cold processes:
    the batches `--train` draws (60 samples in 7 shuffled batches of 8), trained as in one process."""
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(free_port()),
        "-m",
        "localize",
        str(files["mlp"]),
        "--blocks",
        "2",
        "--train",
        "--distributed",
        "--epochs",
        "2",
        "--batch-size",
        "8",
        "--seed",
        "3",
        "--out",
        str(out),
    ]
    [(code, stdout, err)] = wait_all(
        [subprocess.Popen(cmd, env=rank_env(2), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)],
        timeout=120,
    )
    assert code == 0, err[-2000:]
    assert "trained 14 microbatches on 2 stages x 1 replicas" in stdout and "epoch 2/2: loss" in stdout
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint", "metrics.json", "model.pt"]
    lm, mf = load_local_model(str(files["mlp"]), 2, seed=3)
    for epoch in range(2):
        for x, y in epoch_batches(mf.dataset()[0], 8, epoch, 3):
            lm.train_step(x, y)
    state = load_checkpoint(out)
    assert_same_state(state, lm.state_dict(), atol=1e-6)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 14 and metrics["samples"] == 112 and len(metrics["losses"]) == 14
    # the assembled state dict loads into a fresh LocalModel and into the original model
    fresh, _ = load_local_model(str(files["mlp"]), 2, seed=1)
    fresh.load_state_dict(state)
    original = fresh.model.__class__(16, 32, 4, 5)
    original.load_state_dict(model_state_dict(state))
    x = torch.randn(3, 16)
    torch.testing.assert_close(original(x), lm.model(x), atol=1e-6, rtol=0)
    # every stage wrote its shard of OUT/checkpoint: read in this one process, it equals model.pt,
    # and it holds each block's optimizer state at step 14
    assert_same_state(load_checkpoint(out / "checkpoint"), state, atol=0)
    [step] = (out / "checkpoint").iterdir()
    keys = read_keys(step)
    assert step.name == "step-00000014" and "optim/1/state/0/exp_avg" in keys and "optim/0/state/0/exp_avg" in keys


def test_cli_distributed_flags_fail_in_one_line(files, tmp_path):
    """`--distributed` without `--train`, with a flag it cannot honour, or a world size that is not a
    multiple of K: one line from rank 0, exit code 2."""
    cases = [
        ((), 1, "--distributed trains one block per process; add --train"),
        (("--train", "--compare-bp"), 1, "--compare-bp does not apply to --distributed"),
        (("--train", "--resume", str(tmp_path)), 2, "no complete distributed checkpoint there"),
        (("--train",), 3, "world size 3 is not a multiple of the 2 blocks"),
    ]
    for extra, world, message in cases:
        argv = [str(files["mlp"]), "--blocks", "2", "--distributed", "--out", str(tmp_path / "out"), *extra]
        results = wait_all(launch_module("localize.cli.main", argv, world, ranks=min(world, 2)))
        assert all(code == 2 for code, _, _ in results), results
        lines = results[0][2].strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("localize: error: ") and message in lines[0], lines
        assert all(not err.strip() for _, _, err in results[1:])


def test_four_processes_forwarding_values_equal_the_in_process_schedule(files, tmp_path):
    """K = 4: the mask and an int size made by block 0 cross ranks 1 and 2 to reach block 3."""
    ckpt = tmp_path / "ckpt"
    results = wait_all(
        launch(files["masked"], 4, "--blocks", "4", "--batch-size", "10", "--checkpoint", str(ckpt))
    )
    assert [r[0] for r in results] == [0, 0, 0, 0], [r[2][-1500:] for r in results]
    ref = reference(files["masked"], 4, 10)
    assert_same_state(load_checkpoint(ckpt), ref.state_dict(), atol=1e-6)


NAN = MLP.replace("x = torch.randn(60, 16, generator=g)", "x = torch.randn(60, 16, generator=g)\n    x[20:] = float('nan')")


@pytest.mark.parametrize("aux", [a for a in available() if a != "man"])  # man reads the next stage's layer
def test_pipeline_program_and_in_process_end_with_the_same_parameters(aux, files, tmp_path):
    """Three steps of the same batches: 2 ranks over gloo, program.py, and LocalModel.train_step."""
    ckpt = tmp_path / "ckpt"
    procs = launch(files["masked"], 2, "--blocks", "2", "--aux", aux, "--batch-size", "15", "--checkpoint", str(ckpt))
    program_lm, mf = load_local_model(str(files["masked"]), 2, aux=aux)
    program = write_program(program_lm, mf.example_inputs(), tmp_path / "program")
    ref = reference(files["masked"], 2, 15, aux=aux)
    results = wait_all(procs)
    assert [r[0] for r in results] == [0, 0], [r[2][-1500:] for r in results]
    assert_same_state(load_checkpoint(ckpt), ref.state_dict(), atol=0)
    step = program.build().train()
    state = StepState(ref.loss_fn, program.make_optimizers(step))
    batches = list(iter_batches(mf.dataset()[0], 15))
    assert len(batches) == 3
    for x, y in batches:
        run_step(step, state, list(x), y)
    for block in ref.blocks:
        got = dict(step.get_submodule(f"block_{block.index}").named_parameters())
        for name, want in block.module.named_parameters():
            torch.testing.assert_close(got[name], want, atol=0, rtol=0, msg=f"block {block.index} {name}")


def test_gradient_clipping_is_the_same_on_a_pipeline(files, tmp_path):
    """clip_grad_norm is a node of the step graph: each stage clips its block as train_step does."""
    ckpt = tmp_path / "ckpt"
    procs = launch(files["masked"], 2, "--blocks", "2", "--clip", "0.05", "--batch-size", "15", "--checkpoint", str(ckpt))
    ref = reference(files["masked"], 2, 15, clip_grad_norm=0.05)
    unclipped = reference(files["masked"], 2, 15)
    results = wait_all(procs)
    assert [r[0] for r in results] == [0, 0], [r[2][-1500:] for r in results]
    assert_same_state(load_checkpoint(ckpt), ref.state_dict(), atol=0)
    assert any(not torch.equal(a, b) for a, b in zip(ref.state_dict().values(), unclipped.state_dict().values()))


def test_training_loop_options_are_the_same_on_a_pipeline(files, tmp_path):
    """accumulate, autocast, the schedule and clipping are step-graph nodes: each stage runs them as
    train_step does, bit for bit (cosine schedule with warmup, bf16 autocast, 2 batches per update)."""
    import argparse

    ckpt = tmp_path / "ckpt"
    flags = ["--accumulate", "2", "--amp", "bf16", "--schedule", "cosine", "--warmup", "1", "--clip", "0.05"]
    procs = launch(files["masked"], 2, "--blocks", "2", "--batch-size", "9", "--checkpoint", str(ckpt), *flags)
    args = argparse.Namespace(
        clip=0.05, accumulate=2, amp="bf16", schedule="cosine", warmup=1, epochs=1, batch_size=9
    )
    ref = reference(files["masked"], 2, 9, training=args)
    results = wait_all(procs)
    assert [r[0] for r in results] == [0, 0], [r[2][-1500:] for r in results]
    assert_same_state(load_checkpoint(ckpt), ref.state_dict(), atol=0)
    assert ref.schedulers[0].last_epoch == 2 and ref.pending == 1  # 5 batches: 2 updates, 1 pending


@pytest.mark.parametrize("aux", ["dgl", "readout"])
def test_sequence_chunks_on_a_pipeline_equal_the_in_process_schedule(files, tmp_path, aux):
    """--chunk-size under --distributed: each stage trains its block chunk by chunk (SeCO), a readout
    head as its own chunk program, and the pipeline ends where LocalModel.train_step ends in one process."""
    ckpt = tmp_path / "ckpt"
    flags = ["--chunk-size", "4", "--aux", aux]
    procs = launch(files["gpt"], 2, "--blocks", "2", "--batch-size", "8", "--checkpoint", str(ckpt), *flags)
    ref = reference(files["gpt"], 2, 8, chunk_size=4, aux=aux)
    results = wait_all(procs)
    assert [r[0] for r in results] == [0, 0], [r[2][-1500:] for r in results]
    assert ref.chunking is not None and (ref.head_chunk_programs[0] is not None) == (aux == "readout")
    assert_same_state(load_checkpoint(ckpt), ref.state_dict(), atol=1e-6)


@pytest.mark.parametrize("accumulate", [1, 2])
def test_replicas_of_chunked_stages_average_like_one_big_batch(files, tmp_path, accumulate):
    """--chunk-size with K = 2 stages x R = 2 replicas: each replica trains half of every batch chunk
    by chunk; the replicas agree on the loss, then average the gradients after the last chunk (by
    hand: DDP cannot follow one backward per chunk). The result is train_step on the whole batch.
    SGD: the parameters move by the gradients themselves (AdamW would blow the float noise of the
    keys' bias gradient, zero in exact arithmetic, up to a full step of either sign)."""
    ckpt = tmp_path / "ckpt"
    flags = ["--chunk-size", "4", "--accumulate", str(accumulate), "--optimizer", "sgd"]
    procs = launch(files["gpt"], 4, "--blocks", "2", "--batch-size", "8", "--checkpoint", str(ckpt), *flags)
    ref = reference(files["gpt"], 2, 8, chunk_size=4, accumulate=accumulate, optimizer="sgd")
    results = wait_all(procs)
    assert [r[0] for r in results] == [0, 0, 0, 0], [r[2][-1500:] for r in results]
    assert "2 stages x 2 replicas" in results[0][1]
    assert_same_state(load_checkpoint(ckpt), ref.state_dict(), atol=1e-5)


def test_aux_options_reach_every_stage(files, tmp_path):
    """--aux readout --aux-option depth=0 under --distributed: every stage builds and trains the head
    the option asks for (the copied output head only), and the pipeline ends where train_step ends."""
    ckpt = tmp_path / "ckpt"
    flags = ["--aux", "readout", "--aux-option", "depth=0"]
    procs = launch(files["gpt"], 2, "--blocks", "2", "--batch-size", "8", "--checkpoint", str(ckpt), *flags)
    ref = reference(files["gpt"], 2, 8, aux="readout", aux_options={"depth": 0})
    default = reference(files["gpt"], 2, 8, aux="readout")
    results = wait_all(procs)
    assert [r[0] for r in results] == [0, 0], [r[2][-1500:] for r in results]
    got = load_checkpoint(ckpt)
    assert set(got) != set(default.state_dict())  # depth 2 would copy a layer into block 0's head
    assert_same_state(got, ref.state_dict(), atol=1e-6)


def test_recompute_on_a_pipeline_recomputes_and_equals_the_in_process_schedule(files, tmp_path):
    """--recompute under --distributed: each stage's block recomputes its units in backward (the
    units' layers run more often than without), and the pipeline ends where train_step ends."""
    calls = {}
    for flag in ("", "--recompute"):
        ckpt, marker = tmp_path / f"ckpt{flag}", tmp_path / f"calls{flag}"
        procs = launch(files["counted"], 2, "--blocks", "2", "--batch-size", "8", "--checkpoint", str(ckpt),
                       *filter(None, [flag]), MARKER=str(marker))
        results = wait_all(procs)
        assert [r[0] for r in results] == [0, 0], [r[2][-1500:] for r in results]
        calls[flag] = len(marker.read_text().splitlines()) if marker.exists() else 0
        ref = reference(files["counted"], 2, 8, recompute=bool(flag))
        assert bool(ref.recompute_programs) == bool(flag)
        assert_same_state(load_checkpoint(ckpt), ref.state_dict(), atol=0)
    assert calls[""] == 0 and calls["--recompute"] > 0


def test_a_nan_loss_stops_the_pipeline_with_the_in_process_message(tmp_path):
    """on_nan exists once (runtime.ops.check_loss): the rank that meets it says what train_step says."""
    model = tmp_path / "nan.py"
    model.write_text(NAN)
    results = wait_all(launch(model, 2, "--blocks", "2", "--batch-size", "10"))
    lm, mf = load_local_model(str(model), 2)
    batches = list(iter_batches(mf.dataset()[0], 10))
    for x, y in batches[:2]:
        lm.train_step(x, y)
    with pytest.raises(NonFiniteLossError) as raised:
        lm.train_step(*batches[2])
    want = str(raised.value).split(";")[0]  # "block 0 loss is nan at step 2"
    assert results[0][0] == 1 and f"{want} (rank 0);" in results[0][2], results[0][2][-800:]


@pytest.mark.parametrize("accumulate", [1, 2])
def test_replicas_average_gradients_like_one_big_batch(files, tmp_path, accumulate):
    """K = 2 stages x R = 2 replicas under DDP: each replica trains half of every batch of 12,
    gradients averaged; with accumulate=2, DDP does not synchronise between the updates."""
    ckpt = tmp_path / "ckpt"
    flags = ["--accumulate", str(accumulate)]
    results = wait_all(
        launch(files["mlp"], 4, "--blocks", "2", "--batch-size", "12", "--checkpoint", str(ckpt), *flags)
    )
    assert [r[0] for r in results] == [0, 0, 0, 0], [r[2][-1500:] for r in results]
    assert "2 stages x 2 replicas" in results[0][1]
    ref = reference(files["mlp"], 2, 12, accumulate=accumulate)
    assert_same_state(load_checkpoint(ckpt), ref.state_dict(), atol=1e-5)


def test_a_nan_on_one_replica_stops_every_replica_alike(tmp_path):
    """The replicas agree on the loss before backward: the replica whose half of the batch is NaN
    and the one whose half is finite both stop with the in-process message, neither hangs in DDP."""
    model = tmp_path / "nan.py"
    model.write_text(NAN.replace("x[20:] = float('nan')", "x[25:30] = float('nan')"))
    results = wait_all(launch(model, 2, "--blocks", "1", "--batch-size", "10", "--timeout", "20"), timeout=60)
    for code, _, err in results:  # batch 2 = samples 20..29: replica 1's half holds the NaNs
        assert code == 1 and "block 0 loss is nan at step 2" in err, err[-800:]


RECURRENT_NAN = """
import torch
from torch import nn

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = nn.GRU(4, 8, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.rnn(x)[0])

def model():
    return Net()

def example_inputs():
    return (torch.randn(2, 12, 4),)

def dataset():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 12, 4, generator=g)
    x[25:30, 7] = float('nan')
    y = torch.randint(0, 3, (40, 12), generator=g)
    return (x, y), (x, y)
"""


def test_a_nan_on_one_replica_of_a_chunked_stage_stops_every_replica_alike(tmp_path):
    """Chunked replicas agree on the loss value before chunk_backward too: the replica whose half of
    batch 2 holds a NaN and the one whose half is finite both stop with the in-process message."""
    model = tmp_path / "rnn_nan.py"
    model.write_text(RECURRENT_NAN)
    procs = launch(model, 2, "--blocks", "1", "--batch-size", "10", "--chunk-size", "4", "--timeout", "20")
    for code, _, err in wait_all(procs, timeout=60):
        assert code == 1 and "block 0 loss is nan at step 2" in err, err[-800:]


# ----------------------------------------------------------------------------------------------- faults


@pytest.mark.parametrize(
    "sig,timeout", [(signal.SIGKILL, "30"), (signal.SIGSTOP, "3")], ids=["killed", "hung"]
)
def test_a_lost_rank_stops_the_others_with_one_clear_line(files, tmp_path, sig, timeout):
    """Kill (or freeze) the middle rank of 3 mid-run: the ranks before and after it exit non-zero,
    within the timeout, each with one line naming the rank it lost."""
    marker = tmp_path / "started"
    procs = launch(files["stream"], 3, "--blocks", "3", "--timeout", timeout, MARKER=str(marker))
    try:
        deadline = time.time() + 60
        while not marker.exists():
            assert time.time() < deadline and all(p.poll() is None for p in procs), "training did not start"
            time.sleep(0.05)
        time.sleep(0.3)
        start = time.time()
        os.kill(procs[1].pid, sig)
        results = wait_all([procs[0], procs[2]], timeout=60)
        elapsed = time.time() - start
    finally:
        procs[1].kill()
        procs[1].wait()
    assert elapsed < 60 if sig == signal.SIGKILL else elapsed < float(timeout) + 15
    for code, _, err in results:
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert code == 1, err
        assert len(lines) == 1 and lines[0].startswith("localize: error: rank "), err
        assert "lost rank 1 (stage 1, replica 0)" in lines[0], err
        if sig == signal.SIGSTOP:
            assert "Timed out" in lines[0], err


def test_a_rank_that_never_starts_stops_the_others_after_the_startup_timeout(files):
    """World size 3 but only ranks 0 and 1 start: both give up on the rendezvous within the startup
    timeout, exit non-zero, and their last line says which rank could not join."""
    procs = launch(files["mlp"], 3, "--blocks", "3", "--startup-timeout", "3", ranks=2)
    start = time.time()
    results = wait_all(procs, timeout=60)
    assert time.time() - start < 30
    for rank, (code, _, err) in enumerate(results):
        last = err.strip().splitlines()[-1]  # c10d may log socket warnings first
        assert code == 1, err
        assert last.startswith(f"localize: error: rank {rank} could not join the other 2 ranks"), err
        assert "within 3 s" in last and "died before training" in last, err


def test_bad_launches_fail_in_one_line(files):
    """World size not a multiple of K, and K larger than the model's legal cuts: rank 0 prints one line,
    the other ranks exit quietly. Both are caught before the rendezvous, so ranks 0 and 1 suffice."""
    not_multiple = launch(files["mlp"], 3, "--blocks", "2", ranks=2)
    too_many = launch(files["mlp"], 8, "--blocks", "8", ranks=2)
    for procs, pattern in [
        (not_multiple, "world size 3 is not a multiple of the 2 blocks"),
        (too_many, "blocks=8 needs 7 cuts, but this model has only"),
    ]:
        results = wait_all(procs)
        assert all(code == 2 for code, _, _ in results), results
        lines = results[0][2].strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("localize: error: ") and pattern in lines[0], lines
        assert all(not err.strip() for _, _, err in results[1:])  # the other ranks stay quiet
