"""The ``localize MODEL.py`` command: examples end to end, training output, and every bad input.

The CLI runs in-process through ``localize.cli.main.main(argv) -> int``; a few tests start a real
subprocess to check what only a process shows (``python -m localize``, the exit code, stderr).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import localize
from localize.cli.main import build_parser, main
from localize.runtime.schedule import parse_schedule

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("*.py"))

TINY = textwrap.dedent(
    """
    import torch
    from torch import nn


    def model():
        return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))


    def example_inputs():
        return (torch.randn(4, 6),)


    def dataset():
        g = torch.Generator().manual_seed(1)
        x = torch.randn(64, 6, generator=g)
        y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
        return (x[:48], y[:48]), (x[48:], y[48:])
    """
)


@pytest.fixture
def tiny(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.py"
    path.write_text(TINY)
    return path


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


# ------------------------------------------------------------------------------------- examples


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.stem)
def test_every_example_compiles(example: Path, tmp_path: Path, capsys):
    out = tmp_path / "out"
    code, stdout, err = run_cli([example, "--blocks", "4", "--out", out, "--no-onnx"], capsys)
    assert code == 0, err
    doc = json.loads((out / "plan.json").read_text())
    assert doc["num_blocks"] == 4 and len(doc["blocks"]) == 4
    # every node of the graph lands in exactly one block
    nodes = [n for b in doc["blocks"] for n in b["nodes"]]
    assert len(nodes) == len(set(nodes))
    assert doc["program"]["status"] == "ok", doc["program"]
    expected = {"plan.json", "schedule.txt", "weights.pt", "program.py", doc["graph"]}
    expected |= {f"block_{i}.py" for i in range(4)}
    assert expected <= {p.name for p in out.iterdir()}
    assert str(parse_schedule((out / "schedule.txt").read_text())) == doc["schedule"]
    # the summary table names every block and its aux head
    assert "crosses its cut" in stdout and "dgl" in stdout and f"wrote {out}" in stdout.replace("\n", "")


def test_default_out_dir_is_localize_out_stem(tiny: Path, tmp_path: Path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli([tiny, "--blocks", "2", "--no-onnx"], capsys)
    assert code == 0, err
    assert (tmp_path / "localize_out" / "tiny" / "plan.json").is_file()
    # a second run replaces the directory as a whole and leaves no temporary directories behind
    code, _, err = run_cli([tiny, "--blocks", "3", "--no-onnx"], capsys)
    assert code == 0, err
    assert json.loads((tmp_path / "localize_out" / "tiny" / "plan.json").read_text())["num_blocks"] == 3
    assert [p.name for p in (tmp_path / "localize_out").iterdir()] == ["tiny"]


def test_factory_cuts_balance_and_options_reach_the_plan(tmp_path: Path, capsys):
    path = tmp_path / "two.py"
    path.write_text(
        TINY + "\n\ndef wide():\n    return nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Linear(32, 3))\n"
    )
    out = tmp_path / "o"
    code, _, err = run_cli(
        [
            f"{path}:wide",
            "--blocks",
            "2",
            "--out",
            out,
            "--no-onnx",
            "--optimizer",
            "sgd",
            "--lr",
            "0.1",
            "--aux",
            "linear",
            "--balance",
            "params",
            "--seed",
            "3",
        ],
        capsys,
    )
    assert code == 0, err
    doc = json.loads((out / "plan.json").read_text())
    assert doc["model"]["factory"] == "wide" and doc["model"]["params"] == 6 * 32 + 32 + 32 * 3 + 3
    assert doc["options"]["optimizer"]["name"] == "sgd" and doc["options"]["optimizer"]["lr"] == 0.1
    assert doc["options"]["balance"] == "params" and doc["options"]["seed"] == 3
    assert doc["blocks"][0]["aux"]["strategy"] == "linear"

    out = tmp_path / "cuts"
    code, _, err = run_cli([path, "--cuts", "2,4", "--out", out, "--no-onnx"], capsys)
    assert code == 0, err
    doc = json.loads((out / "plan.json").read_text())
    assert doc["num_blocks"] == 3
    assert [b["nodes"][0] for b in doc["blocks"]] == ["_0", "_2", "_4"]


def test_train_compare_bp_writes_metrics_and_curves(tiny: Path, tmp_path: Path, capsys):
    out = tmp_path / "o"
    code, stdout, err = run_cli(
        [
            tiny,
            "--blocks",
            "2",
            "--out",
            out,
            "--no-onnx",
            "--train",
            "--epochs",
            "2",
            "--batch-size",
            "16",
            "--compare-bp",
        ],
        capsys,
    )
    assert code == 0, err
    metrics = json.loads((out / "metrics.json").read_text())
    local, bp = metrics["local"], metrics["backprop"]
    assert [e["epoch"] for e in local["epochs"]] == [1, 2] and [e["epoch"] for e in bp["epochs"]] == [1, 2]
    assert len(local["step_losses"]) == 2 * 3 and all(len(s) == 2 for s in local["step_losses"])
    assert len(bp["step_losses"]) == 6 and all(len(s) == 1 for s in bp["step_losses"])
    assert 0.0 <= local["epochs"][-1]["test_accuracy"] <= 1.0
    assert local["peak_saved_bytes"] > 0 and bp["peak_saved_bytes"] > 0
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "local learning vs backprop" in stdout and "peak saved activations" in stdout
    assert "local (2 blocks) epoch 2/2" in stdout and "backprop epoch 2/2" in stdout
    # the final state is a resumable checkpoint holding the trained weights
    ckpt = torch.load(out / "checkpoint.pt", weights_only=False)
    assert ckpt["data"]["epoch"] == 2 and ckpt["step"] == 6


def test_train_without_dataset_uses_random_data(tmp_path: Path, capsys):
    path = tmp_path / "nodata.py"
    path.write_text(TINY.split("def dataset")[0])
    out = tmp_path / "o"
    code, stdout, err = run_cli(
        [path, "--blocks", "2", "--out", out, "--no-onnx", "--train", "--epochs", "1", "--batch-size", "128"],
        capsys,
    )
    assert code == 0, err
    assert "no dataset()" in stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics["local"]["step_losses"]) == 512 // 128


def test_parser_is_one_function_with_every_flag():
    flags = {a for action in build_parser()._actions for a in action.option_strings}
    assert {
        "--blocks",
        "--aux",
        "--balance",
        "--cuts",
        "--out",
        "--train",
        "--epochs",
        "--batch-size",
        "--lr",
        "--optimizer",
        "--device",
        "--seed",
        "--compare-bp",
        "--checkpoint-every",
        "--resume",
        "--clip",
        "--accumulate",
        "--amp",
        "--schedule",
        "--warmup",
    } <= flags


def test_python_dash_m_localize_runs_the_cli(tmp_path: Path):
    result = subprocess.run(
        [sys.executable, "-m", "localize", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert result.returncode == 0
    assert "--blocks" in result.stdout and "MODEL.py" in result.stdout


# ------------------------------------------------------------------------------------- bad input

BAD_FILES = {
    "syntax.py": "def model(:\n",
    "raises.py": "import torch\nraise RuntimeError('boom at import')\n",
    "nomodel.py": "import torch\ndef example_inputs():\n    return (torch.randn(2, 6),)\n",
    "notmodule.py": "import torch\ndef model():\n    return 3\ndef example_inputs():\n    return (torch.randn(2, 6),)\n",
}

# (argv after the model file, or a whole argv; what the one line must say)
BAD_CASES = {
    "missing file": (["missing.py"], "missing.py: no such file"),
    "syntax error": (["syntax.py"], "syntax error"),
    "raises on import": (["raises.py"], "RuntimeError: boom at import"),
    "no model()": (["nomodel.py"], "defines no model()"),
    "no factory": (["tiny.py:build"], "defines no build()"),
    "model() not a module": (["notmodule.py"], "not a torch.nn.Module"),
    "blocks 0": (["tiny.py", "--blocks", "0"], "--blocks: 0 is out of range"),
    "blocks not a number": (["tiny.py", "--blocks", "four"], "'four' is not a number"),
    "too many blocks": (["tiny.py", "--blocks", "40"], "ask for fewer blocks"),
    "unknown aux": (["tiny.py", "--blocks", "2", "--aux", "nope"], "--aux: invalid choice: 'nope' (choose from 'auglocal'"),
    "cuts name no module": (["tiny.py", "--cuts", "layer9"], "'layer9', which is not a module"),
    "empty cuts": (["tiny.py", "--cuts", ","], "--cuts is empty"),
    "unknown optimizer": (["tiny.py", "--optimizer", "lion"], "invalid choice: 'lion'"),
    "negative lr": (["tiny.py", "--lr", "-1"], "--lr: -1 is out of range"),
    "out is a file": (["tiny.py", "--blocks", "2", "--out", "afile.txt"], "is a file, not a directory"),
    "out under a file": (
        ["tiny.py", "--blocks", "2", "--out", "afile.txt/sub"],
        "is a file, not a directory",
    ),
    "cuda without CUDA": (["tiny.py", "--blocks", "2", "--device", "cuda"], "CUDA is not available"),
    "resume without train": (["tiny.py", "--blocks", "2", "--resume", "afile.txt"], "add --train"),
    "resume missing file": (
        ["tiny.py", "--blocks", "2", "--train", "--resume", "nope.pt"],
        "--resume nope.pt: no such file",
    ),
    "resume not a checkpoint": (
        ["tiny.py", "--blocks", "2", "--train", "--resume", "afile.txt"],
        "not a readable localize checkpoint",
    ),
    "checkpoint-every 0": (
        ["tiny.py", "--train", "--checkpoint-every", "0"],
        "--checkpoint-every: 0 is out of range",
    ),
    "compare-bp without train": (["tiny.py", "--blocks", "2", "--compare-bp"], "add --train"),
    "schedule without train": (["tiny.py", "--blocks", "2", "--schedule", "cosine"], "--schedule only applies"),
    "unknown amp": (["tiny.py", "--amp", "fp8"], "--amp: invalid choice: 'fp8'"),
    "accumulate 0": (["tiny.py", "--accumulate", "0"], "--accumulate: 0 is out of range"),
    "negative warmup": (["tiny.py", "--warmup", "-2"], "--warmup: -2 is out of range"),
    "warmup longer than the run": (
        ["tiny.py", "--blocks", "2", "--train", "--epochs", "1", "--schedule", "cosine", "--warmup", "9"],
        "a cosine schedule over 1 updates leaves nothing after a warmup of 9",
    ),
    "no model argument": ([], "the following arguments are required"),
    "aux option not KEY=VALUE": (["tiny.py", "--aux-option", "width"], "--aux-option 'width' is not KEY=VALUE"),
    "aux option unknown": (["tiny.py", "--blocks", "2", "--aux-option", "depth=2"], "the dgl head has no option(s) ['depth']; valid options are ['pool', 'width']"),
    "aux option twice": (
        ["tiny.py", "--aux-option", "width=8", "--aux-option", "width=16"],
        "--aux-option width is given twice (8 and 16)",
    ),
    "aux option out of range": (
        ["tiny.py", "--blocks", "2", "--aux", "readout", "--aux-option", "depth=deep"], "option depth='deep' is out of range",
    ),
}


@pytest.fixture
def bad_dir(tmp_path: Path, monkeypatch) -> Path:
    for name, source in BAD_FILES.items():
        (tmp_path / name).write_text(source)
    (tmp_path / "tiny.py").write_text(TINY)
    (tmp_path / "afile.txt").write_text("not a directory, not a checkpoint\n")
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize("case", list(BAD_CASES), ids=lambda c: c.replace(" ", "-"))
def test_bad_input_prints_one_line_and_exits_2(case: str, bad_dir: Path, capsys):
    argv, message = BAD_CASES[case]
    if "--out" not in argv and argv:
        argv = [*argv, "--out", "out"]
    if "--device" in argv and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    before = sorted(p.name for p in bad_dir.iterdir())
    code, stdout, err = run_cli(argv, capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("localize: error: ") and message in lines[0], lines[0]
    assert "Traceback" not in err + stdout
    # no partial output: the directory holds what it held before (no out/, no temporary dirs)
    assert sorted(p.name for p in bad_dir.iterdir()) == before


# The list of bad inputs, each through a real `python -m localize` process: what a user sees.
PROCESS_CASES = [
    "missing file",
    "syntax error",
    "raises on import",
    "no model()",
    "model() not a module",
    "blocks 0",
    "out is a file",
    "out under a file",
    "cuda without CUDA",
    "cuts name no module",
]


def test_bad_input_in_real_processes(bad_dir: Path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    before = sorted(p.name for p in bad_dir.iterdir())
    procs = {}
    for i, case in enumerate(PROCESS_CASES):  # all at once: each pays the torch import
        argv = BAD_CASES[case][0]
        if "--out" not in argv:
            argv = [*argv, "--out", f"out{i}"]
        procs[case] = subprocess.Popen(
            [sys.executable, "-m", "localize", *argv],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=bad_dir,
            env=env,
        )
    for case, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=300)
        if case == "cuda without CUDA" and torch.cuda.is_available():
            continue
        assert proc.returncode == 2, (case, stderr)
        assert stdout == "", case
        lines = stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in stderr, (case, stderr)
        assert lines[0].startswith("localize: error: ") and BAD_CASES[case][1] in lines[0], (case, lines[0])
    assert sorted(p.name for p in bad_dir.iterdir()) == before  # no partial output of any run


def test_ctrl_c_leaves_no_output_and_exits_130(tiny: Path, tmp_path: Path, capsys, monkeypatch):
    import localize.codegen.artifacts

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(localize.codegen.artifacts, "write_graph", interrupted)  # in the middle of writing
    code, _, err = run_cli([tiny, "--blocks", "2", "--out", tmp_path / "o", "--no-onnx"], capsys)
    assert code == 130 and "interrupted" in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.py"]


def test_base_install_without_extras_writes_what_it_can_and_names_the_extra(tmp_path, capsys, monkeypatch):
    """No pydot, matplotlib or onnx: compile and train still work; each skipped output is one line
    that names the extra which adds it (never a traceback), and plan.json says what was skipped."""
    for module in ("pydot", "matplotlib", "matplotlib.pyplot", "onnx", "onnxruntime"):
        monkeypatch.setitem(sys.modules, module, None)  # import fails as if not installed
    out = tmp_path / "out"
    code = main([str(ROOT / "examples" / "digits_cnn.py"), "--blocks", "2", "--out", str(out), "--train", "--epochs", "1"])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    assert "Traceback" not in printed.out + printed.err
    lines = [line for line in printed.out.splitlines() if line.startswith("skipped: ")]
    assert lines == [
        "skipped: graph.svg needs pydot, which is not installed: pip install 'localize-learning[plot]'",
        "skipped: block_<i>.onnx needs onnx, which is not installed: pip install 'localize-learning[export]'",
        "skipped: curves.png needs matplotlib, which is not installed: pip install 'localize-learning[plot]'",
    ]
    doc = json.loads((out / "plan.json").read_text())
    assert "graph" not in doc and len(doc["skipped"]) == 2
    written = {p.name for p in out.iterdir()}
    assert {"program.py", "metrics.json", "block_0.py"} <= written and not written & {"graph.svg", "graph.dot", "curves.png"}


BAD = textwrap.dedent(
    """
    import torch
    from torch import nn


    class Bad(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 4)
            self.b = nn.Linear(4, 2)

        def forward(self, x):
            h = self.a(x)
            if h.sum() > 0:  # data-dependent: neither fx nor export captures it
                h = h * 2
            return self.b(h)


    def model():
        return Bad()


    def example_inputs():
        return (torch.randn(3, 4),)
    """
)


def test_an_uncapturable_model_prints_one_line_and_keeps_torchs_output_in_a_log(tmp_path):
    path = tmp_path / "bad.py"
    path.write_text(BAD)
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-m", "localize", str(path), "--blocks", "2", "--out", str(out)],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )
    assert result.returncode == 2 and result.stdout == ""
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    log = tmp_path / "out.trace.log"
    assert f"(torch's messages are in {log})" in result.stderr
    assert "if h.sum() > 0" in result.stderr and "def forward" in log.read_text()  # the graph dump moved
    assert not out.exists()


SKIP = textwrap.dedent(
    """
    import torch
    from torch import nn


    class Skip(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c, self.d = nn.Linear(6, 16), nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 3)

        def forward(self, x):
            h = torch.relu(self.a(x))
            g = torch.relu(self.c(torch.relu(self.b(h))))
            return self.d(g + h)  # h crosses every cut between a and the add


    def model():
        return Skip()


    def example_inputs():
        return (torch.randn(4, 6),)
    """
)


def test_max_frontier_flag_allows_cuts_across_two_activations(tmp_path, capsys):
    path = tmp_path / "skip.py"
    path.write_text(SKIP)
    code, _, err = run_cli([path, "--blocks", "4", "--out", tmp_path / "a", "--no-onnx"], capsys)
    assert code == 2 and "raise max_frontier (--max-frontier)" in err
    code, out, err = run_cli([path, "--blocks", "4", "--max-frontier", "2", "--out", tmp_path / "b", "--no-onnx"], capsys)
    assert code == 0, err
    doc = json.loads((tmp_path / "b" / "plan.json").read_text())
    assert doc["options"]["max_frontier"] == 2 and doc["num_blocks"] == 4


GPT_FILE = textwrap.dedent(
    """
    import torch
    from localize.zoo import GPT


    def model():
        return GPT(vocab_size=16, block_size=8, dim=16, depth=4, heads=2)


    def example_inputs():
        return (torch.randint(0, 16, (2, 8)),)
    """
)


def test_aux_option_flags_build_the_head_transform_builds(tmp_path, capsys):
    """--aux readout --aux-option depth=0: the plan records the option and every head is the one
    transform(aux_options={"depth": 0}) builds (the copied output head, no copied layer)."""
    from localize.compiler.model_file import load_model_file, localize_file

    path = tmp_path / "gpt.py"
    path.write_text(GPT_FILE)
    heads = {}
    for name, flags in {"default": [], "depth 0": ["--aux-option", "depth=0"]}.items():
        out = tmp_path / name.replace(" ", "_")
        code, _, err = run_cli([path, "--blocks", "4", "--aux", "readout", *flags, "--out", out, "--no-onnx"], capsys)
        assert code == 0, err
        doc = json.loads((out / "plan.json").read_text())
        heads[name] = [b["aux"]["params"] for b in doc["blocks"] if b["aux"]]
    assert doc["options"]["aux_options"] == {"depth": 0}
    lm, _ = localize_file(load_model_file(str(path)), blocks=4, aux="readout", aux_options={"depth": 0})
    assert heads["depth 0"] == [sum(p.numel() for p in lm.aux[str(i)].parameters()) for i in range(3)]
    assert all(a < b for a, b in zip(heads["depth 0"], heads["default"]))


def test_threads_flag_sets_and_shows_the_thread_count(tiny, tmp_path, capsys):
    before = torch.get_num_threads()
    try:
        code, out, err = run_cli([tiny, "--blocks", "2", "--out", tmp_path / "o", "--no-onnx", "--threads", "2"], capsys)
        assert code == 0, err
        assert torch.get_num_threads() == 2 and "threads: 2" in out
    finally:
        torch.set_num_threads(before)


def test_help_lists_every_strategy_every_default_and_an_example(capsys):
    from localize.aux import available

    with pytest.raises(SystemExit):
        main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "{" + ",".join(available()) + "}" in text
    for option in ("--blocks", "--aux", "--epochs", "--batch-size", "--lr", "--optimizer", "--max-frontier", "--threads"):
        i = text.index(option + " ", text.index("options:"))
        assert "(default:" in text[i : i + 400], option
    assert "Example: localize examples/mnist1d_resnet.py" in text


def test_clip_flag_reaches_the_step_and_plan(tiny, tmp_path, capsys):
    code, out, err = run_cli([tiny, "--blocks", "2", "--out", tmp_path / "o", "--no-onnx", "--clip", "0.5"], capsys)
    assert code == 0, err
    assert json.loads((tmp_path / "o" / "plan.json").read_text())["options"]["clip_grad_norm"] == 0.5
    assert "clip_gradients(state, 0, checked_0, 0.5)" in (tmp_path / "o" / "program.py").read_text()


def test_training_loop_flags_reach_the_step_the_plan_and_program(tiny, tmp_path, capsys):
    """--accumulate/--amp/--schedule/--warmup: the same step in process and in program.py; the
    schedule runs over the run's updates (2 epochs x 3 batches / 2 = 3) and --compare-bp's backprop
    trains with the same options."""
    out = tmp_path / "o"
    argv = [tiny, "--blocks", "2", "--out", out, "--no-onnx", "--train", "--epochs", "2", "--batch-size", "16",
            "--accumulate", "2", "--amp", "bf16", "--schedule", "cosine", "--warmup", "1", "--compare-bp"]
    code, stdout, err = run_cli(argv, capsys)
    assert code == 0, err
    options = json.loads((out / "plan.json").read_text())["options"]
    assert options["accumulate"] == 2 and options["autocast"] == "bf16"
    assert options["schedule"] == {"kind": "cosine", "warmup": 1}
    program = (out / "program.py").read_text()
    assert "SCHEDULE = LRSchedule(kind='cosine', total=3, warmup=1)" in program
    assert "AUTOCAST = 'bf16'" in program and "accumulate = 2" in program
    ckpt = localize.load(str(out / "checkpoint.pt"))
    assert [s["last_epoch"] for s in ckpt.schedulers] == [3, 3] and ckpt.pending == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics["local"]["step_losses"]) == 6 and len(metrics["backprop"]["step_losses"]) == 6


def test_resume_refuses_a_schedule_of_another_length(tiny, tmp_path, capsys):
    """A cosine schedule fitted to 1 epoch would run past its end (and rise again) over 2."""
    common = [tiny, "--blocks", "2", "--no-onnx", "--train", "--batch-size", "16", "--schedule", "cosine"]
    code, _, err = run_cli([*common, "--epochs", "1", "--out", tmp_path / "a"], capsys)
    assert code == 0, err
    resume = ["--resume", tmp_path / "a" / "checkpoint.pt"]
    code, _, err = run_cli([*common, "--epochs", "2", *resume, "--out", tmp_path / "b"], capsys)
    assert code == 2 and "the checkpoint's --schedule runs over 3 updates, this run's over 6" in err, err
