"""Bad input to `lowrank train` / `lowrank bench`: a package error naming the option, key or file,
raised before anything is deleted, trained or written (an existing run or bench is left as it was)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from lowrank.bench import run_bench
from lowrank.cli import _load_commands, app
from lowrank.errors import CheckpointError, ConfigError, TrainingError
from lowrank.train import TrainConfig, Trainer, latest_checkpoint, list_checkpoints, read_checkpoint

_load_commands()
TINY = ["--task", "pretrain", "--model", "llama-tiny", "--steps", "2", "--batch-size", "2", "--seq-len", "32",
        "--eval-size", "4", "--threads", "1", "--no-progress"]
BASE = dict(task="pretrain", model="llama-tiny", steps=2, batch_size=2, seq_len=32, eval_size=4, progress=False, threads=1)
BENCH = ["bench", "--task", "pretrain", "--model", "llama-tiny", "--methods", "lora", "--steps", "2", "--batch-size", "2",
         "--seq-len", "32", "--eval-size", "4", "--threads", "1", "--no-progress"]


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def copy(src: Path, dst: Path) -> tuple[Path, dict[str, bytes]]:
    shutil.copytree(src, dst)
    return dst, snapshot(dst)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("train") / "run"
    Trainer(TrainConfig(out=str(out), method="lora", **BASE)).fit()
    return out


@pytest.fixture(scope="module")
def finished_bench(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bench") / "b"
    run_bench(task="pretrain", model="llama-tiny", methods=["lora"], steps=2, batch_size=2, seq_len=32, eval_size=4,
              threads=1, isolate=False, progress=False, out=str(out))
    return out


@pytest.mark.parametrize("args, match", [
    (["--threads", "-2"], "threads must be a positive integer, got -2"),
    (["--device", "cuda:x"], r"device must be cpu, cuda\[:N\] or auto, got 'cuda:x'"),
    (["--device", "cuda:99"], "device 'cuda:99' (is not available|does not exist)"),
    (["--seed", "99999999999999999999"], "seed must be an integer from 0 to 4294967295"),
    (["--lr", "inf"], "lr must be a finite non-negative number, got inf"),
    (["--grad-clip", "nan"], "grad_clip must be a finite number >= 0"),
    (["--method-options", "rank=abc"], "method_options rank must be a positive integer, got 'abc'"),
    (["--method-options", "rank=1.5"], "method_options rank must be a positive integer, got 1.5"),
    (["--method-options", "rank=true"], "method_options rank must be a positive integer, got True"),
    (["--method-options", "lr=abc"], "method_options lr must be a finite non-negative number, got 'abc'"),
    (["--method-options", "lr=-5"], "method_options lr must be a finite non-negative number, got -5"),
    (["--method-options", "dropout=abc"], "dropout must be a number"),
    (["--method-options", "weight_decay=abc"], r"method 'lora': method_options \{'weight_decay': 'abc'\} are refused"),
    (["--rank", "4", "--method-options", "rank=8"], r"rank 4 \(--rank\) and method_options rank=8 disagree"),
])
def test_train_bad_option_leaves_the_previous_run(tmp_path, finished_run, args, match):
    out, before = copy(finished_run, tmp_path / "run")
    res = CliRunner().invoke(app, ["train", *TINY, "--method", "lora", *args, "--out", str(out), "--overwrite"])
    assert type(res.exception) is ConfigError, res.output
    assert re.search(match, str(res.exception))
    assert snapshot(out) == before


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA machine has --device cuda")
def test_train_cuda_without_cuda(tmp_path):
    res = CliRunner().invoke(app, ["train", *TINY, "--device", "cuda", "--out", str(tmp_path / "r")])
    assert isinstance(res.exception, ConfigError) and "device 'cuda' is not available" in str(res.exception)
    assert not (tmp_path / "r").exists()


def test_config_file_threads(tmp_path, finished_run):
    out, before = copy(finished_run, tmp_path / "run")
    cfg = tmp_path / "run.toml"
    cfg.write_text(f'task = "pretrain"\nmodel = "llama-tiny"\nthreads = -1\nout = "{out}"\noverwrite = true\n')
    res = CliRunner().invoke(app, ["train", "--config", str(cfg), "--no-progress"])
    assert isinstance(res.exception, ConfigError) and "threads must be a positive integer, got -1" in str(res.exception)
    assert snapshot(out) == before


def test_resume_a_finished_run_without_checkpoints_is_refused(tmp_path):
    out = tmp_path / "r"
    res = CliRunner().invoke(app, ["train", *TINY, "--checkpoint-every", "0", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert not (out / "checkpoints").exists()
    before = snapshot(out)
    res = CliRunner().invoke(app, ["train", *TINY, "--checkpoint-every", "0", "--out", str(out), "--resume"])
    assert isinstance(res.exception, CheckpointError), res.output
    assert "no checkpoint to resume from" in str(res.exception) and "--overwrite" in str(res.exception)
    assert snapshot(out) == before


def test_resume_into_checkpoints_that_is_a_file(tmp_path):
    out = tmp_path / "r"
    out.mkdir()
    (out / "checkpoints").write_text("not a directory")
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 5.0}\n')
    before = snapshot(out)
    with pytest.raises(ConfigError, match="checkpoints' is a file, where the run writes its checkpoints directory"):
        Trainer(TrainConfig(out=str(out), method="lora", resume=True, **BASE))
    assert snapshot(out) == before


@pytest.fixture(scope="module")
def three_checkpoints(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ck") / "run"
    Trainer(TrainConfig(out=str(out), method="lora", save_final=False, checkpoint_every=1, keep_checkpoints=0,
                        **{**BASE, "steps": 3})).fit()
    return out


def test_keep_checkpoints_zero_keeps_all(three_checkpoints):
    assert [s for s, _ in list_checkpoints(three_checkpoints / "checkpoints")] == [1, 2, 3]


@pytest.mark.parametrize("corrupt, match", [
    (lambda m: m.update(state=[1, 2]), "its state is a list"),
    (lambda m: m.update(state={"__dict__": [["x", {"__dtype__": "nosuch"}]]}), "unknown dtype 'nosuch'"),
    (lambda m: m.update(state={"__dict__": [["x", {"__dtype__": "nn"}]]}), "unknown dtype 'nn'"),
    (lambda m: m.update(format_version="2"), "format_version must be a positive integer, got '2'"),
    (lambda m: m.update(state={"__dict__": 5}), "state.json is corrupt"),
    (None, "incomplete: model.safetensors is missing"),
])
def test_corrupt_checkpoint_is_a_checkpoint_error_and_falls_back(tmp_path, three_checkpoints, corrupt, match):
    out, _ = copy(three_checkpoints, tmp_path / "run")
    newest = out / "checkpoints" / "step-00000003"
    if corrupt is None:
        (newest / "model.safetensors").unlink()
    else:
        meta = json.loads((newest / "state.json").read_text())
        corrupt(meta)
        (newest / "state.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=match):
        read_checkpoint(newest)
    path, step, _, _, skipped = latest_checkpoint(out / "checkpoints")
    assert step == 2 and path.name == "step-00000002" and len(skipped) == 1
    t = Trainer(TrainConfig(out=str(out), method="lora", save_final=False, checkpoint_every=1, keep_checkpoints=0,
                            resume=True, **{**BASE, "steps": 3}))
    assert t.resume() and t.step == 2


@pytest.mark.parametrize("args, exc, match", [
    (["--steps", "0"], ConfigError, "--steps must be a positive integer, got 0"),
    (["--batch-size", "0"], ConfigError, "--batch-size must be a positive integer, got 0"),
    (["--seq-len", "0"], ConfigError, "--seq-len must be a positive integer, got 0"),
    (["--steps", "-1"], ConfigError, "--steps must be a positive integer, got -1"),
    (["--rank", "0"], ConfigError, "method 'lora': rank must be a positive integer, got 0"),
    (["--device", "tpu"], ConfigError, "method 'lora': device must be cpu"),
    (["--threads", "-1"], ConfigError, "method 'lora': threads must be a positive integer, got -1"),
    (["--threads", "-1", "--in-process"], ConfigError, "threads must be a positive integer, got -1"),
    (["--seed", "99999999999999999999"], ConfigError, "seed must be an integer"),
    (["--rank", "4", "--method-options", "rank=8"], ConfigError, "disagree"),
    (["--methods", "full,lora", "--method-options", "foo=1"], ConfigError, "method 'full' has no option 'foo'"),
    # lora takes any option name in its signature: refused when it builds, and no report is written
    (["--method-options", "foo=1", "--in-process"], TrainingError, "no method ran .*has no option 'foo'"),
    (["--method-options", "foo=1"], TrainingError, "no method ran .*has no option 'foo'"),
])
def test_bench_bad_option_leaves_the_previous_bench(tmp_path, finished_bench, args, exc, match):
    out, before = copy(finished_bench, tmp_path / "b")
    assert "runs/lora/train_config.json" in before and "results.md" in before
    res = CliRunner().invoke(app, [*BENCH, *args, "--out", str(out)])
    assert type(res.exception) is exc, res.output
    assert re.search(match, str(res.exception))
    assert snapshot(out) == before


def test_bench_out_under_a_file(tmp_path):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ConfigError, match="afile' is not a writable directory"):
        run_bench(task="pretrain", methods=["lora"], steps=1, out=str(tmp_path / "afile" / "x"))


def test_bench_zero_is_not_the_default():
    with pytest.raises(ConfigError, match="--steps must be a positive integer, got 0"):
        run_bench(task="pretrain", methods=["lora"], steps=0, out="unused")


def test_cli_prints_error_and_exits_2_without_traceback(tmp_path):
    for cmd in (["train", *TINY, "--threads", "-2", "--out", str(tmp_path / "t")],
                [*BENCH, "--threads", "-1", "--out", str(tmp_path / "b")]):
        proc = subprocess.run([sys.executable, "-m", "lowrank", *cmd], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.startswith("error: ") and "threads must be a positive integer" in proc.stderr
        assert "Traceback" not in proc.stderr
    assert not list(tmp_path.iterdir())


def test_ctrl_c_while_the_package_imports_exits_quietly():
    """SIGINT during `import lowrank` (torch, transformers: over a second) ends with status 130
    and no traceback (the console entry point lives outside the package for this)."""
    import signal
    import subprocess
    import sys
    import time

    proc = subprocess.Popen([sys.executable, "-c", "from lowrank_launch import main; main()", "methods"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # wait until the child is inside the import (torch's library is mapped): a signal during the
    # interpreter's own start-up, before the entry point runs, is not what this test is about
    maps = f"/proc/{proc.pid}/maps"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            with open(maps) as fh:
                if "libtorch" in fh.read():
                    break
        except OSError:
            pass
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, (proc.returncode, err[-2000:])
    assert "Traceback" not in err
