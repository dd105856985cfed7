"""train.py end to end on CPU: synthetic data, the CIFAR-10 loading path on tiny CIFAR-format files,
the offline error, resume, the LR range test, and DistributedDataParallel through torchrun (gloo)."""
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import train  # noqa: E402

HISTORY_KEYS = {"epoch", "lr", "train_loss", "train_acc", "test_loss", "test_acc", "seconds"}
SMALL = ["--dataset", "synthetic", "--train-size", "512", "--test-size", "256", "--batch-size", "64",
         "--no-progress", "--workers", "0"]


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
    history = train.main(["--dataset", "synthetic", "--train-size", "2048", "--test-size", "512", "--epochs", "3",
                          "--no-progress", "--workers", "0", "--out", str(out)])
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
        batch = {"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
                 "labels": rng.integers(0, 10, per_batch).tolist(), "batch_label": name}
        (folder / name).write_bytes(pickle.dumps(batch))
    meta = {"label_names": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                            "truck"]}
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
    history = train.main(["--dataset", "cifar10", "--data-dir", str(tmp_path / "data"), "--no-download",
                          "--epochs", "1", "--batch-size", "32", "--no-progress", "--workers", "0",
                          "--out", str(tmp_path / "out")])
    assert len(history) == 1 and (tmp_path / "out" / "history.json").exists()


def test_missing_cifar10_offline_stops_with_directions(tmp_path, capsys):
    with pytest.raises(SystemExit) as err:
        train.main(["--data-dir", str(tmp_path / "nowhere"), "--no-download", "--out", str(tmp_path / "o")])
    message = str(err.value)
    assert "cifar-10-batches-py" in message and str(tmp_path / "nowhere") in message
    assert "--dataset synthetic" in message and "--data-dir" in message
    assert not (tmp_path / "o").exists()  # no empty run folder left behind


def test_help_explains_every_flag():
    out = subprocess.run([sys.executable, str(ROOT / "train.py"), "--help"], capture_output=True, text=True,
                         check=True).stdout
    for flag in ("--dataset", "--data-dir", "--no-download", "--train-size", "--test-size", "--backend", "--device",
                 "--batch-size", "--seed", "--amp", "--workers", "--batchnorm", "--dropout", "--out", "--resume",
                 "--lr-find", "--max-lr", "--epochs"):
        assert flag in out


def test_ddp_with_torchrun_gloo(tmp_path):
    out = tmp_path / "ddp"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29533",
         str(ROOT / "train.py"), *SMALL, "--device", "cpu", "--epochs", "1", "--out", str(out)],
        capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    history = json.loads((out / "history.json").read_text())
    assert len(history) == 1 and 0 <= history[0]["test_acc"] <= 1
    assert proc.stdout.count("epoch   1/1") == 1  # only rank 0 reports
    assert "2 process(es)" in proc.stdout
