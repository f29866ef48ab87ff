"""`lowrank train` end to end on llama-tiny: outputs, exact resume, kill -9 mid-checkpoint, NaN, bad input."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from lowrank.cli import _load_commands, app
from lowrank.errors import CheckpointError, ConfigError, DataError, ShapeError, TrainingError
from lowrank.train import MetricsLog, TrainConfig, Trainer, list_checkpoints
from lowrank.train.checkpoint import decode, encode

_load_commands()
TINY = ["--task", "pretrain", "--model", "llama-tiny", "--batch-size", "2", "--seq-len", "32",
        "--eval-size", "4", "--threads", "1", "--no-progress"]
BASE = dict(task="pretrain", model="llama-tiny", batch_size=2, seq_len=32, eval_size=4, progress=False, threads=1)


def losses(out: Path) -> list[float]:
    return [r["loss"] for r in MetricsLog.read(out / "metrics.jsonl") if "loss" in r]


def test_train_cli_writes_metrics_checkpoints_and_adapter(tmp_path):
    out = tmp_path / "run"
    res = CliRunner().invoke(app, ["train", *TINY, "--method", "lora", "--rank", "4", "--steps", "6",
                                   "--eval-every", "3", "--checkpoint-every", "3", "--out", str(out)])
    assert res.exit_code == 0, res.output
    recs = MetricsLog.read(out / "metrics.jsonl")
    assert [r["step"] for r in recs if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in recs if "eval_loss" in r] == [3, 6]
    assert all(r["tokens"] == 64 and r["tokens_per_s"] > 0 for r in recs if "loss" in r)
    assert [s for s, _ in list_checkpoints(out / "checkpoints")] == [3, 6]
    cfg = json.loads((out / "final" / "adapter_config.json").read_text())
    assert cfg["lowrank"]["method"] == "lora" and cfg["lowrank"]["rank"] == 4
    # the saved adapter reproduces the trained model's evaluation on a fresh base
    import lowrank
    from lowrank.models import load_model

    trained = Trainer(TrainConfig(out=str(tmp_path / "x"), method="lora", rank=4, steps=1, **BASE))
    fresh = load_model("llama-tiny", objective="lm", pretrained=False, seed=0).model
    lowrank.load_adapter(fresh, out / "final")
    fresh.eval()
    assert abs(trained.task.evaluate(fresh)["eval_loss"] - recs[-1]["eval_loss"]) < 1e-5
    summary = json.loads((out / "summary.json").read_text())
    assert summary["trainable_params"] > 0 and summary["optimizer_state_bytes"] > 0


def test_resume_reproduces_the_uninterrupted_loss_sequence(tmp_path):
    kw = dict(BASE, method="dora", steps=12, checkpoint_every=4, eval_every=4, save_final=False)
    ref = Trainer(TrainConfig(out=str(tmp_path / "ref"), **kw)).fit()

    t = Trainer(TrainConfig(out=str(tmp_path / "cut"), **kw))
    real = t.task.train_batch

    def interrupted(i, b):  # dies during step 10, after the checkpoint of step 8
        if i == 9:
            raise KeyboardInterrupt
        return real(i, b)

    t.task.train_batch = interrupted
    with pytest.raises(KeyboardInterrupt):
        t.fit()
    assert len(losses(tmp_path / "cut")) == 9
    resumed = Trainer(TrainConfig(out=str(tmp_path / "cut"), resume=True, **kw))
    res = resumed.fit()
    assert resumed.resumed_from.endswith("step-00000008")
    assert losses(tmp_path / "cut") == losses(tmp_path / "ref")  # bit-identical
    assert res.final_eval == ref.final_eval
    # a different batch size cannot silently continue the run
    with pytest.raises(CheckpointError, match="batch_size"):
        Trainer(TrainConfig(out=str(tmp_path / "cut"), resume=True, **{**kw, "batch_size": 3})).resume()


KILLER = textwrap.dedent(
    """
    import os, signal, sys, json
    import torch
    torch.set_num_threads(1)
    import lowrank.train.checkpoint as ck
    real = ck.save_file
    calls = [0]
    def save_then_die(tensors, path, metadata=None):
        calls[0] += 1
        if calls[0] == 3:  # model.safetensors of the second checkpoint: half written, then SIGKILL
            real(tensors, path, metadata=metadata)
            with open(path, "r+b") as f:
                f.truncate(os.path.getsize(path) // 2)
            os.kill(os.getpid(), signal.SIGKILL)
        return real(tensors, path, metadata=metadata)
    ck.save_file = save_then_die
    from lowrank.train import TrainConfig, Trainer
    Trainer(TrainConfig(**json.loads(sys.argv[1]))).fit()
    """
)


def test_killed_mid_checkpoint_write_resumes_from_previous(tmp_path):
    kw = dict(BASE, method="lora", steps=9, checkpoint_every=3, save_final=False)
    out = tmp_path / "killed"
    proc = subprocess.run([sys.executable, "-c", KILLER, json.dumps(dict(kw, out=str(out)))],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr[-2000:]
    ck = out / "checkpoints"
    assert [s for s, _ in list_checkpoints(ck)] == [3]
    assert any(p.name.startswith(".tmp-step-00000006") for p in ck.iterdir())  # the torn write
    t = Trainer(TrainConfig(out=str(out), resume=True, **kw))
    t.fit()
    assert t.resumed_from.endswith("step-00000003")
    assert not any(p.name.startswith(".tmp") for p in ck.iterdir())
    ref = Trainer(TrainConfig(out=str(tmp_path / "ref"), **kw)).fit()
    assert losses(out) == ref.losses


def test_corrupt_newest_checkpoint_falls_back(tmp_path):
    kw = dict(BASE, method="full", steps=4, checkpoint_every=2, save_final=False)
    out = tmp_path / "r"
    Trainer(TrainConfig(out=str(out), **kw)).fit()
    newest = out / "checkpoints" / "step-00000004" / "state.safetensors"
    newest.write_bytes(newest.read_bytes()[:50])
    t = Trainer(TrainConfig(out=str(out), resume=True, **kw))
    t.fit()
    assert t.resumed_from.endswith("step-00000002")
    assert [r["step"] for r in MetricsLog.read(out / "metrics.jsonl") if "loss" in r] == [1, 2, 3, 4]


def test_nan_loss_stops_naming_the_step_and_keeps_the_checkpoint(tmp_path):
    out = tmp_path / "nan"
    res = CliRunner().invoke(app, ["train", *TINY, "--method", "full", "--steps", "10", "--lr", "1e30",
                                   "--checkpoint-every", "1", "--out", str(out)])
    assert isinstance(res.exception, TrainingError), res.output
    msg = str(res.exception)
    assert "loss is nan at step 2" in msg and "step-00000001" in msg
    assert [s for s, _ in list_checkpoints(out / "checkpoints")] == [1]
    # the kept checkpoint resumes (with a sane LR the run would go on from step 1)
    found = Trainer(TrainConfig(out=str(out), resume=True, method="full", steps=10, lr=1e30, checkpoint_every=1, **BASE))
    assert found.resume() and found.step == 1


def test_bad_input_errors(tmp_path):
    def run(**kw):
        return Trainer(TrainConfig(out=str(tmp_path / "e"), overwrite=True, **{**BASE, "steps": 1, **kw}))

    with pytest.raises(ConfigError, match="seq_len 4096 exceeds the 1024 positions"):
        run(method="lora", seq_len=4096)
    with pytest.raises(ShapeError, match="method 'lora' on model 'llama-tiny'.*rank 500 exceeds"):
        run(method="lora", rank=500)
    with pytest.raises(DataError, match="does not exist"):
        run(method="lora", data=str(tmp_path / "nope.txt"))
    with pytest.raises(ConfigError, match="does not apply to task 'pretrain'"):
        run(method="head")
    with pytest.raises(ConfigError, match="has no option 'bogus'"):
        run(method="full", method_options={"bogus": 1})
    run(method="lora", steps=1).fit()
    with pytest.raises(ConfigError, match="already holds a run"):
        Trainer(TrainConfig(out=str(tmp_path / "e"), method="lora", **{**BASE, "steps": 1}))


def test_bad_setup_leaves_the_output_directory_as_it_was(tmp_path):
    out = tmp_path / "new" / "run"
    with pytest.raises(DataError):  # fails while loading: no directory is created
        Trainer(TrainConfig(out=str(out), method="lora", data=str(tmp_path / "nope.txt"), **BASE))
    assert not (tmp_path / "new").exists()
    bad_model = tmp_path / "m"
    bad_model.mkdir()
    (bad_model / "config.json").write_text('{"model_type": "lla')  # truncated
    with pytest.raises(ConfigError, match="does not load as a Hugging Face checkpoint"):
        Trainer(TrainConfig(out=str(out), method="lora", **{**BASE, "model": str(bad_model)}))
    assert not (tmp_path / "new").exists()
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    with pytest.raises(ConfigError, match="is a file"):
        Trainer(TrainConfig(out=str(a_file), method="lora", **BASE))
    # --overwrite replaces a run only once the new one has loaded
    run = tmp_path / "done"
    Trainer(TrainConfig(out=str(run), method="lora", steps=1, **BASE)).fit()
    before = sorted(p.name for p in run.iterdir())
    with pytest.raises(ShapeError):
        Trainer(TrainConfig(out=str(run), method="lora", rank=500, overwrite=True, **{**BASE, "steps": 1}))
    assert sorted(p.name for p in run.iterdir()) == before


@pytest.mark.parametrize("kw, match", [
    ({"overwrite": "false"}, "overwrite must be true or false"),
    ({"method_options": [1]}, "method_options must be a table of options"),
    ({"resume": True, "overwrite": True}, "pass one of them"),
    ({"optimizer_options": {"foo": 1}}, "optimizer_options apply to --optimizer"),
    ({"optimizer": "adamw", "optimizer_options": {"foo": 1}}, "optimizer adamw"),
])
def test_config_values_are_checked(tmp_path, kw, match):
    with pytest.raises(ConfigError, match=match):
        Trainer(TrainConfig(out=str(tmp_path / "r"), method="lora", **{**BASE, "steps": 1, **kw}))


def test_paths_may_be_pathlike(tmp_path):
    t = Trainer(TrainConfig(out=tmp_path / "p", method="lora", **{**BASE, "steps": 1}))
    assert t.config.out == str(tmp_path / "p")
    t.fit()
    assert (tmp_path / "p" / "summary.json").exists()


def test_resume_with_other_steps_is_refused(tmp_path):
    out = tmp_path / "r"
    kw = dict(BASE, method="lora", steps=2, checkpoint_every=1, save_final=False)
    Trainer(TrainConfig(out=str(out), **kw)).fit()
    t = Trainer(TrainConfig(out=str(out), resume=True, **dict(kw, steps=4)))
    with pytest.raises(CheckpointError, match="steps: checkpoint 2 vs now 4"):
        t.resume()


def test_config_file_and_classification_head(tmp_path):
    cfg = tmp_path / "run.toml"
    cfg.write_text(textwrap.dedent(f"""
        task = "finetune"
        model = "llama-tiny"
        data = "stdlib-docstrings"
        method = "lora"
        steps = 3
        batch_size = 4
        seq_len = 24
        eval_size = 8
        out = "{tmp_path / 'cls'}"
        method_options = "alpha=8"
    """))
    res = CliRunner().invoke(app, ["train", "--config", str(cfg), "--rank", "2", "--no-progress", "--threads", "1"])
    assert res.exit_code == 0, res.output
    rec = json.loads((tmp_path / "cls" / "final" / "adapter_config.json").read_text())["lowrank"]
    assert rec["rank"] == 2 and rec["alpha"] == 8 and rec["modules_to_save"] == ["classifier"]
    assert "eval_accuracy" in MetricsLog.read(tmp_path / "cls" / "metrics.jsonl")[-1]
    assert len(json.loads((tmp_path / "cls" / "final" / "labels.json").read_text())) == 8


def test_state_encoding_round_trip():
    opt_state = {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(2, 3)}},
                 "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.999), "params": [0]}], "dtype": torch.bfloat16}
    tensors: dict = {}
    enc = json.loads(json.dumps(encode(opt_state, tensors)))
    dec = decode(enc, tensors)
    assert dec["param_groups"][0]["betas"] == (0.9, 0.999) and 0 in dec["state"]
    assert torch.equal(dec["state"][0]["exp_avg"], opt_state["state"][0]["exp_avg"])
    assert dec["dtype"] is torch.bfloat16
    with pytest.raises(CheckpointError, match=r"state\['x'\] holds a builtins.object"):
        encode({"x": object()}, {})


def test_gradient_accumulation_matches_the_larger_batch(tmp_path):
    # micro-batches 2 x 2 draw the same windows as one batch of 4: same loss and gradient norm
    kw = dict(BASE, method="full", steps=2, save_final=False, checkpoint_every=0)
    Trainer(TrainConfig(out=str(tmp_path / "a"), **{**kw, "batch_size": 4})).fit()
    Trainer(TrainConfig(out=str(tmp_path / "b"), **{**kw, "batch_size": 2, "grad_accum": 2})).fit()
    ra = [r for r in MetricsLog.read(tmp_path / "a" / "metrics.jsonl") if "loss" in r]
    rb = [r for r in MetricsLog.read(tmp_path / "b" / "metrics.jsonl") if "loss" in r]
    assert ra[0]["tokens"] == rb[0]["tokens"] == 4 * 32
    for x, y in zip(ra, rb):
        assert abs(x["loss"] - y["loss"]) < 1e-4 and abs(x["grad_norm"] - y["grad_norm"]) < 1e-3 * x["grad_norm"]


def test_recipes_build_torch_adamw_fused_where_torch_can():
    """The built-in recipes' AdamW is torch's own, fused for CPU/CUDA float tensors (same math to
    rounding, one pass per tensor) and torch's default elsewhere."""
    from lowrank.recipes._defaults import adamw

    cpu = [torch.zeros(3, 4, requires_grad=True)]
    assert adamw(cpu, lr=1e-3).defaults["fused"] is True
    meta = [torch.zeros(3, 4, device="meta", requires_grad=True)]
    assert not adamw(meta, lr=1e-3).defaults["fused"]
    ref = torch.zeros(3, 4, requires_grad=True)
    ref_opt = torch.optim.AdamW([ref], lr=1e-2, foreach=False)
    opt = adamw(cpu, lr=1e-2)
    for step in range(3):
        g = torch.randn(3, 4, generator=torch.Generator().manual_seed(step))
        cpu[0].grad, ref.grad = g.clone(), g.clone()
        opt.step()
        ref_opt.step()
    torch.testing.assert_close(cpu[0], ref, rtol=1e-6, atol=1e-7)


_FAULTS_ON_REALLOC = textwrap.dedent("""
    import resource, sys, torch
    from lowrank.train import keep_freed_heap
    applied = keep_freed_heap()
    for _ in range(3):                        # 32 MB allocated, written and freed, as a step would
        x = torch.ones(8 * 2**20); del x
    f = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    x = torch.ones(8 * 2**20); del x          # once more, in the steady state
    print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f)
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_keep_freed_heap_reuses_freed_memory_and_can_be_turned_off():
    """The training processes keep freed activations: in the steady state a freed 32 MB block is
    allocated again without touching a fresh page (glibc's defaults map it anew each time: 8192
    faults); LOWRANK_MALLOC=default opts out."""
    import os

    def run(env_value):
        env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
        if env_value is not None:
            env["LOWRANK_MALLOC"] = env_value
        out = subprocess.run([sys.executable, "-c", _FAULTS_ON_REALLOC], capture_output=True, text=True, env=env, check=True)
        applied, faults = out.stdout.split()
        return applied == "True", int(faults)

    applied, faults = run(None)
    assert applied and faults < 500
    applied, faults = run("default")
    assert not applied and faults > 4000
