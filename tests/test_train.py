"""train.py end to end on CPU: synthetic data, the CIFAR-10 loading path on tiny CIFAR-format files,
the offline error, resume, the LR range test, and DistributedDataParallel through torchrun (gloo)."""

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import train  # noqa: E402
from training import checkpoints, loop  # noqa: E402

HISTORY_KEYS = {"epoch", "lr", "train_loss", "train_acc", "test_loss", "test_acc", "seconds"}
SMALL = [
    "--dataset",
    "synthetic",
    "--train-size",
    "512",
    "--test-size",
    "256",
    "--batch-size",
    "64",
    "--no-progress",
    "--workers",
    "0",
]


def run(tmp_path, *extra):
    out = tmp_path / "run"
    history = train.main([*SMALL, "--out", str(out), *extra])
    return out, history


def test_synthetic_run_writes_every_output(tmp_path):
    out, history = run(tmp_path, "--epochs", "2")
    for name in ("history.json", "curves.png", "misclassified.png", "checkpoint.pt", "final.pt"):
        assert (out / name).is_file(), name
    saved = json.loads((out / "history.json").read_text())
    assert saved == history and [h["epoch"] for h in saved] == [1, 2]
    assert all(set(h) == HISTORY_KEYS and all(np.isfinite(v) for v in h.values()) for h in saved)
    ckpt = torch.load(out / "checkpoint.pt", weights_only=False)
    assert {"model", "optimizer", "scheduler", "scaler", "epoch", "rng", "history"} <= set(ckpt)
    best = torch.load(out / "final.pt", weights_only=False)
    assert best["test_acc"] == max(h["test_acc"] for h in saved)
    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"


def test_accuracy_rises_well_above_chance(tmp_path):
    out = tmp_path / "learn"
    history = train.main(
        [
            "--dataset",
            "synthetic",
            "--train-size",
            "2048",
            "--test-size",
            "512",
            "--epochs",
            "3",
            "--no-progress",
            "--workers",
            "0",
            "--out",
            str(out),
        ]
    )
    assert history[-1]["test_acc"] > 0.25  # chance is 0.10
    assert history[-1]["train_loss"] < history[0]["train_loss"]


def test_resume_gives_the_same_history(tmp_path):
    whole = train.main([*SMALL, "--epochs", "3", "--out", str(tmp_path / "whole")])
    part = train.main([*SMALL, "--epochs", "3", "--out", str(tmp_path / "part"), "--stop-after-epoch", "1"])
    assert len(part) == 1 and not (tmp_path / "part" / "misclassified.png").exists()
    resumed = train.main(["--resume", str(tmp_path / "part"), "--no-progress", "--workers", "0"])
    strip = lambda h: [{k: v for k, v in e.items() if k != "seconds"} for e in h]  # noqa: E731
    assert strip(resumed) == strip(whole)


def test_lr_range_test_picks_and_plots(tmp_path):
    out, history = run(tmp_path, "--epochs", "1", "--lr-find", "--batch-size", "16")
    assert (out / "lr_find.png").is_file()
    max_lr = torch.load(out / "checkpoint.pt", weights_only=False)["args"]["max_lr"]
    assert 1e-6 < max_lr < 1.0 and max_lr != train.DEFAULT_MAX_LR


def write_tiny_cifar(root: Path, per_batch: int = 20) -> None:
    """Pickled batches in the real CIFAR-10 python layout (str keys, as the Python 2 originals load
    under latin-1), with random images."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {
            "data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
            "labels": rng.integers(0, 10, per_batch).tolist(),
            "batch_label": name,
        }
        (folder / name).write_bytes(pickle.dumps(batch))
    meta = {"label_names": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta))


def test_cifar10_loading_path_on_tiny_files(tmp_path, monkeypatch):
    write_tiny_cifar(tmp_path / "data")
    # The tiny files cannot match the real archive's checksums; everything else is torchvision's path.
    monkeypatch.setattr(torchvision.datasets.CIFAR10, "_check_integrity", lambda self: True)
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *args, **kwargs: True)
    from model.data import load_cifar10

    data = load_cifar10(tmp_path / "data", download=False)
    assert data.train.images.shape == (100, 3, 32, 32) and data.train.images.dtype == torch.uint8
    assert data.test.images.shape == (20, 3, 32, 32) and data.classes[0] == "airplane"
    raw = pickle.loads((tmp_path / "data" / "cifar-10-batches-py" / "data_batch_1").read_bytes())
    assert torch.equal(data.train.images[0], torch.from_numpy(raw["data"][0].reshape(3, 32, 32)))
    history = train.main(
        [
            "--dataset",
            "cifar10",
            "--data-dir",
            str(tmp_path / "data"),
            "--no-download",
            "--epochs",
            "1",
            "--batch-size",
            "32",
            "--no-progress",
            "--workers",
            "0",
            "--out",
            str(tmp_path / "out"),
        ]
    )
    assert len(history) == 1 and (tmp_path / "out" / "history.json").exists()


def test_missing_cifar10_offline_stops_with_directions(tmp_path, capsys):
    with pytest.raises(SystemExit) as err:
        train.main(["--data-dir", str(tmp_path / "nowhere"), "--no-download", "--out", str(tmp_path / "o")])
    message = str(err.value)
    assert "cifar-10-batches-py" in message and str(tmp_path / "nowhere") in message
    assert "--dataset synthetic" in message and "--data-dir" in message
    assert not (tmp_path / "o").exists()  # no empty run folder left behind


def test_help_explains_every_flag():
    out = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "--help"], capture_output=True, text=True, check=True
    ).stdout
    for flag in (
        "--dataset",
        "--data-dir",
        "--no-download",
        "--train-size",
        "--test-size",
        "--backend",
        "--device",
        "--batch-size",
        "--seed",
        "--amp",
        "--workers",
        "--batchnorm",
        "--dropout",
        "--out",
        "--resume",
        "--lr-find",
        "--max-lr",
        "--epochs",
    ):
        assert flag in out


def test_ddp_with_torchrun_gloo(tmp_path):
    out = tmp_path / "ddp"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node=2",
            "--master_port=29533",
            str(ROOT / "train.py"),
            *SMALL,
            "--device",
            "cpu",
            "--epochs",
            "1",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    history = json.loads((out / "history.json").read_text())
    assert len(history) == 1 and 0 <= history[0]["test_acc"] <= 1
    assert proc.stdout.count("epoch   1/1") == 1  # only rank 0 reports
    assert "2 process(es)" in proc.stdout


# --- runs that must not be lost or go wrong -------------------------------------------------------


def test_out_that_holds_a_run_is_refused_unless_overwrite(tmp_path, capsys):
    out, _ = run(tmp_path, "--epochs", "1")
    before = (out / "checkpoint.pt").read_bytes()
    with pytest.raises(SystemExit) as err:
        train.main([*SMALL, "--epochs", "1", "--out", str(out)])
    assert err.value.code == 2
    message = capsys.readouterr().err
    assert "already holds a run" in message and f"--resume {out}" in message and "--overwrite" in message
    assert (out / "checkpoint.pt").read_bytes() == before  # nothing touched
    (out / "lr_find.png").write_bytes(b"stale")  # an output the new run does not write
    history = train.main([*SMALL, "--epochs", "1", "--seed", "3", "--out", str(out), "--overwrite"])
    assert len(history) == 1 and not (out / "lr_find.png").exists()
    assert torch.load(out / "checkpoint.pt", weights_only=False)["args"]["seed"] == 3


@pytest.mark.parametrize(
    "flag,value",
    [
        ("--max-lr", "0"),
        ("--max-lr", "-1e-3"),
        ("--max-lr", "nan"),
        ("--train-size", "0"),
        ("--test-size", "0"),
        ("--batch-size", "0"),
        ("--epochs", "0"),
        ("--seed", "-1"),
        ("--dropout", "1"),
        ("--dropout", "-0.1"),
        ("--stop-after-epoch", "0"),
        ("--workers", "-1"),
        ("--weight-decay", "-1"),
        ("--device", "tpu"),
        ("--device", "cuda:7" if torch.cuda.is_available() else "cuda"),
        ("--epochs", "two"),
    ],
)
def test_out_of_range_flags_are_refused_before_any_data_is_loaded(flag, value, monkeypatch, capsys, tmp_path):
    def no_data(*args, **kwargs):
        raise AssertionError("data was loaded before the flags were checked")

    monkeypatch.setattr(train, "load_synthetic", no_data)
    with pytest.raises(SystemExit) as err:
        train.main(["--dataset", "synthetic", flag, value, "--out", str(tmp_path / "o")])
    assert err.value.code == 2
    assert flag in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_sizes_larger_than_the_data_set_are_refused(tmp_path, monkeypatch):
    write_tiny_cifar(tmp_path / "data")
    monkeypatch.setattr(torchvision.datasets.CIFAR10, "_check_integrity", lambda self: True)
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *args, **kwargs: True)
    with pytest.raises(SystemExit, match="--train-size 500: the cifar10 train split has only 100 images"):
        train.main(
            [
                "--dataset",
                "cifar10",
                "--data-dir",
                str(tmp_path / "data"),
                "--no-download",
                "--train-size",
                "500",
                "--out",
                str(tmp_path / "o"),
            ]
        )


def test_resume_refuses_changed_settings(tmp_path, capsys):
    out, _ = run(tmp_path, "--epochs", "2", "--stop-after-epoch", "1")
    with pytest.raises(SystemExit) as err:
        train.main(["--resume", str(out), "--epochs", "5", "--max-lr", "0.1"])
    assert err.value.code == 2
    assert "--epochs, --max-lr cannot be changed" in capsys.readouterr().err


def test_resume_with_another_process_count_is_refused(tmp_path):
    out, _ = run(tmp_path, "--epochs", "2", "--stop-after-epoch", "1")
    ckpt = torch.load(out / "checkpoint.pt", weights_only=False)
    ckpt["world_size"] = 2  # as if started under torchrun --nproc_per_node=2
    checkpoints.atomic_save(ckpt, out / "checkpoint.pt")
    with pytest.raises(SystemExit, match=r"started with 2 process\(es\) and is resumed with 1.*--nproc_per_node=2"):
        train.main(["--resume", str(out), "--no-progress", "--workers", "0"])


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_damaged_checkpoint_is_refused_with_the_file_named(tmp_path, damage):
    out, _ = run(tmp_path, "--epochs", "2", "--stop-after-epoch", "1")
    path = out / "checkpoint.pt"
    assert (out / "checkpoint.pt.sha256").read_text().split() == [checkpoints.sha256(path)]
    data = bytearray(path.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0x01
    else:
        data = data[: len(data) // 3]
    path.write_bytes(bytes(data))
    with pytest.raises(SystemExit) as err:
        train.main(["--resume", str(out), "--no-progress", "--workers", "0"])
    message = str(err.value)
    assert str(path) in message and "damaged" in message and "SHA-256" in message


def test_unreadable_checkpoint_without_a_checksum_names_the_file(tmp_path):
    out, _ = run(tmp_path, "--epochs", "2", "--stop-after-epoch", "1")
    (out / "checkpoint.pt.sha256").unlink()
    (out / "checkpoint.pt").write_bytes((out / "checkpoint.pt").read_bytes()[:100])
    with pytest.raises(SystemExit, match="checkpoint.pt could not be read"):
        train.main(["--resume", str(out), "--no-progress", "--workers", "0"])


def test_a_kill_while_saving_leaves_a_verifiable_checkpoint(tmp_path, monkeypatch):
    """Between the rename of the new file and the final checksum record, both hashes are accepted."""
    path = tmp_path / "c.pt"
    checkpoints.atomic_save({"epoch": 1}, path)
    real_replace = os.replace
    calls = []

    def replace_then_die(src, dst):
        real_replace(src, dst)
        calls.append(dst)
        if str(dst) == str(path):  # the new checkpoint is in place; its final record is not yet written
            raise KeyboardInterrupt

    monkeypatch.setattr(checkpoints.os, "replace", replace_then_die)
    with pytest.raises(KeyboardInterrupt):
        checkpoints.atomic_save({"epoch": 2}, path)
    monkeypatch.setattr(checkpoints.os, "replace", real_replace)
    assert checkpoints.load_verified(path, "test")["epoch"] == 2


def test_diverging_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    out = tmp_path / "run"
    real_ce = loop.F.cross_entropy
    steps = {"n": 0}

    def cross_entropy(logits, labels, **kwargs):
        loss = real_ce(logits, labels, **kwargs)
        if not kwargs:  # training steps (evaluation sums with reduction="sum")
            steps["n"] += 1
            if steps["n"] == 8 + 3:  # epoch 2, step 3 (8 steps per epoch)
                return loss * float("nan")
        return loss

    monkeypatch.setattr(loop.F, "cross_entropy", cross_entropy)
    with pytest.raises(SystemExit) as err:
        train.main([*SMALL, "--epochs", "3", "--out", str(out)])
    message = str(err.value)
    assert "epoch 2, step 3" in message and "--max-lr" in message and "holds epoch 1" in message
    ckpt = checkpoints.load_verified(out / "checkpoint.pt", "test")
    assert ckpt["epoch"] == 1 and all(torch.isfinite(v).all() for v in ckpt["model"].values())
    assert torch.load(out / "final.pt", weights_only=False)["epoch"] == 1
    assert len(json.loads((out / "history.json").read_text())) == 1


def test_ctrl_c_ends_with_one_line_that_says_how_to_resume(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "train.py"),
            "--dataset",
            "synthetic",
            "--train-size",
            "512",
            "--test-size",
            "64",
            "--batch-size",
            "64",
            "--epochs",
            "100000",  # never reached: the run must still be training when interrupted (50 was not enough)
            "--no-progress",
            "--workers",
            "0",
            "--out",
            str(out),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    deadline = time.time() + 240
    while not (out / "checkpoint.pt").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    time.sleep(0.5)  # into epoch 2
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-2000:]
    assert "Traceback" not in stderr
    assert f"continue with python train.py --resume {out}" in stderr
    resumed = train.main(["--resume", str(out), "--no-progress", "--workers", "0", "--stop-after-epoch", "2"])
    assert [h["epoch"] for h in resumed][-1] == 2


def test_weights_that_turn_non_finite_at_an_epochs_end_are_not_saved(tmp_path, monkeypatch):
    """The last step of an epoch can make the weights NaN while its loss was still finite."""
    real_train_epoch = train.train_epoch

    def poisoning_train_epoch(ctx, epoch, bar):
        result = real_train_epoch(ctx, epoch, bar)
        if epoch == 2:
            with torch.no_grad():
                next(ctx.net.parameters()).fill_(float("nan"))
        return result

    monkeypatch.setattr(train, "train_epoch", poisoning_train_epoch)
    out = tmp_path / "run"
    with pytest.raises(SystemExit, match="weights stopped being finite in epoch 2.*holds epoch 1"):
        train.main([*SMALL, "--epochs", "3", "--out", str(out)])
    ckpt = checkpoints.load_verified(out / "checkpoint.pt", "test")
    assert ckpt["epoch"] == 1 and all(torch.isfinite(v).all() for v in ckpt["model"].values())
    assert torch.load(out / "final.pt", weights_only=False)["epoch"] == 1
    assert [h["epoch"] for h in json.loads((out / "history.json").read_text())] == [1]


def test_lr_find_and_max_lr_together_are_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as err:
        train.main([*SMALL, "--lr-find", "--max-lr", "0.05", "--out", str(tmp_path / "o")])
    assert err.value.code == 2 and "--lr-find" in capsys.readouterr().err


@pytest.mark.parametrize(
    "extra,message",
    [
        ([], "--cuda-graph needs a CUDA device"),
        (["--amp", "fp16"], "loss scaler reads the gradients on the host"),
        (["--compile"], "--cuda-graph and --compile: give one"),
        (["--optimizer", "sgd"], "does not support --optimizer sgd"),
    ],
)
def test_cuda_graph_combinations_it_cannot_run_are_refused(tmp_path, capsys, monkeypatch, extra, message):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the same answer with or without a GPU
    with pytest.raises(SystemExit) as err:
        train.main([*SMALL, "--cuda-graph", *extra, "--out", str(tmp_path / "o")])
    assert err.value.code == 2 and message in capsys.readouterr().err


def test_cuda_graph_run_trains_as_the_eager_run_does(tmp_path):
    """The step replayed as a graph (device-side schedule, capturable Adam) against the eager step on
    the same seed: the same curve within float tolerance (the augmentation's random numbers inside a
    graph come from the same generator, offsets advanced per replay)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    args = [*SMALL, "--device", "cuda", "--epochs", "3", "--train-size", "1000"]  # 1000: a partial last batch
    eager = train.main([*args, "--out", str(tmp_path / "eager")])
    graphed = train.main([*args, "--cuda-graph", "--out", str(tmp_path / "graph")])
    for e, g in zip(eager, graphed, strict=True):
        assert g["lr"] == pytest.approx(e["lr"], rel=1e-6)
        assert abs(g["test_acc"] - e["test_acc"]) < 0.05 and g["train_loss"] == pytest.approx(e["train_loss"], rel=0.05)
    resumed = train.main([*args, "--cuda-graph", "--out", str(tmp_path / "part"), "--stop-after-epoch", "1"])
    resumed = train.main(["--resume", str(tmp_path / "part"), "--no-progress", "--workers", "0"])
    assert [h["epoch"] for h in resumed] == [1, 2, 3]
