"""The presets (model/presets.py, `train.py --preset`, `python -m model --preset`): every write-up's system
trains an epoch and writes its outputs, has its parameter count and its math; explicit flags override a
preset's settings; a preset run resumes; the default run's settings are today's."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import train  # noqa: E402
from model.data import AUGMENTATIONS  # noqa: E402
from model.presets import PRESETS, build_model, parameter_count  # noqa: E402
from model.stn import STNet  # noqa: E402
from model.variants import BatchAttentionBlock, BatchAttentionNet, ElementwiseUltimusBlock  # noqa: E402
from model.vit import Attention, VisionTransformer, ViTConfig  # noqa: E402
from training import checkpoints  # noqa: E402
from training.cli import DEFAULTS, build_parser, parse_args  # noqa: E402
from training.optim import make_optimizer, make_schedule  # noqa: E402
from ultimus_kernels import UltimusBlock  # noqa: E402

PARAMETERS = {
    "assignment": 26_074,  # 25,882 + BatchNorm's 2 x (16 + 32 + 48)
    "elementwise": 25_882,  # the write-up's count
    "batch-attention": 21_058,  # one shared block: 25,882 - 3 x 1,608
    "no-bias": 25_488,  # the write-up's count
    "stn": 39_884,
    "vit": 1_205_898,
}
# One step per epoch: a step of the ViT takes seconds on a 2-core CPU.
TINY = [
    "--dataset",
    "synthetic",
    "--train-size",
    "16",
    "--test-size",
    "8",
    "--batch-size",
    "16",
    "--no-progress",
    "--workers",
    "0",
]
# The assignment's LR range test sweeps 200 steps: 4 here, to stay fast.
FAST = {"assignment": ["--lr-find-steps", "4"]}


def checkpoint_of(out: Path) -> dict:
    return torch.load(out / "checkpoint.pt", weights_only=False)


def test_every_preset_is_listed_with_its_parameter_count():
    assert set(PARAMETERS) == set(PRESETS)
    for name, count in PARAMETERS.items():
        assert parameter_count(build_model(name)) == count, name


@pytest.mark.parametrize("name", list(PRESETS))
def test_each_preset_trains_an_epoch_and_writes_every_output(name, tmp_path, capsys):
    out = tmp_path / name
    history = train.main([*TINY, "--preset", name, "--epochs", "1", "--out", str(out), *FAST.get(name, [])])
    assert len(history) == 1 and all(math.isfinite(v) for v in history[0].values())
    expected = {"history.json", "curves.png", "misclassified.png", "checkpoint.pt", "final.pt"}
    expected |= {"stn.png"} if name == "stn" else set()
    expected |= {"lr_find.png"} if name == "assignment" else set()
    written = {path.name for path in out.iterdir() if not path.name.endswith(".sha256")}
    assert written == expected
    for png in (n for n in expected if n.endswith(".png")):
        assert (out / png).read_bytes()[:4] == b"\x89PNG", png
    assert json.loads((out / "history.json").read_text()) == history

    ckpt = checkpoint_of(out)
    args = ckpt["args"]
    assert args["preset"] == name
    given = {"batch_size", "epochs", "lr_find_steps"}  # set on the command line above
    for key, value in PRESETS[name].settings.items():
        if key not in given:
            assert args[key] == value, key
    net = build_model(name)  # the saved weights are this preset's model
    net.load_state_dict(ckpt["model"])
    assert parameter_count(net) == PARAMETERS[name]

    startup = capsys.readouterr().out.splitlines()[0]
    assert startup.startswith(f"preset {name}: {type(net).__name__}: {PARAMETERS[name]:,} parameters")
    if name in ("elementwise", "batch-attention"):
        assert "run in plain PyTorch" in startup or "runs in plain PyTorch" in startup
    elif name in ("assignment", "no-bias"):
        assert "blocks run on" in startup


def test_explicit_flags_override_the_preset(tmp_path):
    out = tmp_path / "run"
    train.main(
        [*TINY, "--preset", "no-bias", "--epochs", "1", "--out", str(out), "--augment", "none"]
        + ["--optimizer", "sgd", "--momentum", "0.5", "--max-lr", "0.05", "--anneal", "linear"]
    )
    ckpt = checkpoint_of(out)
    args = ckpt["args"]
    assert (args["augment"], args["optimizer"], args["momentum"], args["max_lr"]) == ("none", "sgd", 0.5, 0.05)
    assert args["batch_size"] == 16 and args["epochs"] == 1 and args["conv_dropout"] == 0.0
    assert args["div_factor"] == DEFAULTS["div_factor"]  # neither given nor set by the preset
    group = ckpt["optimizer"]["param_groups"][0]
    assert group["momentum"] == 0.5 and group["initial_lr"] == pytest.approx(0.05 / 25)  # SGD, one-cycle start
    assert ckpt["scheduler"]["_anneal_func_type"] == "linear"
    net = build_model("no-bias")
    net.load_state_dict(ckpt["model"])  # the model is still the preset's


def test_assignment_schedule_is_the_write_ups():
    """OneCycleLR with pct_start 5/24, div_factor 100, final_div_factor 1000, linear, two phases: over 24
    epochs of 10 steps, a linear rise from 1e-5 to the peak by the end of epoch 5, then a linear fall to 1e-8."""
    args = parse_args(["--preset", "assignment", "--max-lr", "1e-3"])
    assert args.lr_find is False and (args.batchnorm, args.conv_dropout) == (True, 0.05)
    opt = make_optimizer(args, [torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    sched = make_schedule(args, opt, 1e-3, steps_per_epoch=10)
    lrs = []
    for _ in range(240):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(1e-5) and lrs[49] == pytest.approx(1e-3) and max(lrs) == lrs[49]
    assert lrs[-1] == pytest.approx(1e-8, rel=0.01, abs=1e-9) or lrs[-1] < 1e-5 * 0.01
    rise, fall = torch.tensor(lrs[:50]).diff(), torch.tensor(lrs[49:]).diff()
    assert torch.allclose(rise, rise[0].expand_as(rise), rtol=1e-4) and (rise > 0).all()  # linear, up
    assert torch.allclose(fall, fall[0].expand_as(fall), rtol=1e-4) and (fall < 0).all()  # linear, down
    assert opt.param_groups[0]["min_lr"] == pytest.approx(1e-8)


def test_an_explicit_max_lr_replaces_the_assignments_range_test(tmp_path):
    out = tmp_path / "run"
    train.main([*TINY, "--preset", "assignment", "--epochs", "1", "--max-lr", "1e-3", "--out", str(out)])
    ckpt = checkpoint_of(out)
    assert ckpt["args"]["lr_find"] is False and not (out / "lr_find.png").exists()
    assert ckpt["optimizer"]["param_groups"][0]["max_lr"] == 1e-3


def test_a_preset_run_resumes_to_the_same_result(tmp_path):
    whole = train.main([*TINY, "--preset", "stn", "--epochs", "2", "--out", str(tmp_path / "whole")])
    part = train.main(
        [*TINY, "--preset", "stn", "--epochs", "2", "--out", str(tmp_path / "part"), "--stop-after-epoch", "1"]
    )
    assert len(part) == 1 and not (tmp_path / "part" / "stn.png").exists()
    resumed = train.main(["--resume", str(tmp_path / "part"), "--no-progress", "--workers", "0"])
    strip = lambda h: [{k: v for k, v in e.items() if k != "seconds"} for e in h]  # noqa: E731
    assert strip(resumed) == strip(whole)
    assert (tmp_path / "part" / "stn.png").is_file()  # the resumed run is still an STN run
    with pytest.raises(SystemExit):  # a resumed run keeps its preset
        train.main(["--resume", str(tmp_path / "part"), "--preset", "vit"])


def test_a_checkpoint_from_before_presets_resumes_with_the_default_settings(tmp_path):
    out = tmp_path / "old"
    train.main([*TINY, "--epochs", "2", "--out", str(out), "--stop-after-epoch", "1"])
    ckpt = checkpoint_of(out)
    before_presets = {"preset", "conv_dropout", "augment", "test_batch_size", "optimizer", "momentum", "schedule"}
    before_presets |= {"pct_start", "div_factor", "final_div_factor", "anneal", "three_phase"}
    before_presets |= {"lr_find_start", "lr_find_end", "lr_find_steps"}
    ckpt["args"] = {k: v for k, v in ckpt["args"].items() if k not in before_presets}
    del ckpt["total_steps"]
    checkpoints.atomic_save(ckpt, out / "checkpoint.pt")
    resumed = train.main(["--resume", str(out), "--no-progress", "--workers", "0"])
    assert [h["epoch"] for h in resumed] == [1, 2]
    assert checkpoint_of(out)["args"]["augment"] == "crop-flip-cutout8"


def test_without_a_preset_the_settings_are_the_ones_train_py_always_had():
    args = vars(parse_args(["--dataset", "synthetic"]))
    assert args["preset"] is None
    assert {key: args[key] for key in DEFAULTS} == {
        "batchnorm": False,
        "dropout": 0.0,
        "conv_dropout": 0.0,
        "augment": "crop-flip-cutout8",
        "epochs": 24,
        "batch_size": 128,
        "test_batch_size": 1000,
        "optimizer": "adam",
        "momentum": 0.9,
        "weight_decay": 0.0,
        "max_lr": None,
        "schedule": "onecycle",
        "pct_start": 0.3,  # OneCycleLR's own defaults: the schedule train.py always built
        "div_factor": 25.0,
        "final_div_factor": 1e4,
        "anneal": "cos",
        "three_phase": False,
        "lr_find": False,
        "lr_find_pick": "min10",
        "lr_find_start": 1e-6,
        "lr_find_end": 1.0,
        "lr_find_steps": 100,
    }
    assert set(build_model(None).state_dict()) == set(build_model("elementwise").state_dict())


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--preset", "elementwise", "--backend", "cpu"], "--backend cpu: the fused backends compute only"),
        (["--preset", "batch-attention", "--backend", "triton"], "use --backend auto or reference"),
        (["--preset", "vit", "--backend", "cpu"], "no ultimus block"),
        (["--preset", "vit", "--batchnorm"], "--batchnorm: preset vit's model has no such option"),
        (["--preset", "stn", "--conv-dropout", "0.1"], "--conv-dropout: preset stn's model"),
        (["--preset", "stn", "--pct-start", "0.2"], "--pct-start: not used by this run (--schedule constant"),
        (["--preset", "elementwise", "--momentum", "0.5"], "--momentum: not used"),
        (["--preset", "assignment", "--max-lr", "1e-3", "--lr-find-steps", "5"], "--lr-find-steps: not used"),
        (["--preset", "assignment", "--lr-find-start", "0.01"], "must be below --lr-find-end 0.001"),
        (["--preset", "nope"], "invalid choice: 'nope'"),
        (["--pct-start", "1"], "--pct-start"),
        (["--div-factor", "0"], "--div-factor"),
        (["--lr-find-steps", "1"], "--lr-find-steps"),
        (["--test-batch-size", "0"], "--test-batch-size"),
    ],
)
def test_settings_a_run_cannot_use_are_refused_before_any_data_is_loaded(argv, message, monkeypatch, capsys):
    def no_data(*args, **kwargs):
        raise AssertionError("data was loaded before the flags were checked")

    monkeypatch.setattr(train, "load_synthetic", no_data)
    with pytest.raises(SystemExit) as err:
        train.main(["--dataset", "synthetic", *argv])
    assert err.value.code == 2
    assert message.lower() in capsys.readouterr().err.lower()


def test_explicit_lr_find_replaces_a_presets_peak_and_no_lr_find_drops_its_range_test():
    args = parse_args(["--preset", "elementwise", "--lr-find"])
    assert args.lr_find and args.max_lr is None
    args = parse_args(["--preset", "assignment", "--no-lr-find"])
    assert not args.lr_find and args.max_lr is None  # train.py then uses DEFAULT_MAX_LR
    args = parse_args(["--preset", "assignment", "--no-batchnorm", "--epochs", "3"])
    assert (args.batchnorm, args.epochs, args.batch_size, args.lr_find_end) == (False, 3, 512, 1e-3)


def test_help_lists_every_preset_with_one_line():
    text = build_parser().format_help()
    for name, preset in PRESETS.items():
        line = next(line for line in text.splitlines() if line.startswith(f"  {name} "))
        assert preset.summary.split()[0] in line, name
    for flag in ("--preset", "--optimizer", "--schedule", "--pct-start", "--div-factor", "--final-div-factor"):
        assert flag in text
    for flag in ("--anneal", "--three-phase", "--lr-find-end", "--lr-find-steps", "--augment", "--conv-dropout"):
        assert flag in text


def test_python_m_model_prints_every_presets_summary(monkeypatch, capsys):
    from model.__main__ import main  # `python -m model`, in this process (a fresh one costs seconds)

    monkeypatch.setattr(sys, "argv", ["python -m model", "--all"])
    main()
    out = capsys.readouterr().out
    for name, count in PARAMETERS.items():
        assert f"preset {name}: " in out and f"{count:,} parameters" in out and f"total params: {count:,}" in out
    assert "BatchAttentionBlock x 4" in out  # one block, applied four times
    assert "(1, 48, 26, 26)" in out  # no-bias: unpadded convolutions


def test_readme_table_has_every_preset_and_its_reported_accuracy():
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Presets") :]
    section = section[: section.index("\n## ", 1)]
    for name, preset in PRESETS.items():
        row = next(line for line in section.splitlines() if line.startswith(f"| `{name}` |"))
        assert preset.reported in row and f"{PARAMETERS[name]:,}" in row, name
    assert "test batch size" in section  # the batch-attention caveat


# --- the models' math ---------------------------------------------------------------------------


def test_elementwise_block_is_the_write_ups_formula():
    torch.manual_seed(0)
    block = ElementwiseUltimusBlock(48, 8).double()
    x = torch.randn(5, 48, dtype=torch.float64)
    expected = []
    for xb in x:  # one sample at a time, straight from the write-up's formula
        q, k, v = (layer.weight @ xb + layer.bias for layer in (block.q, block.k, block.v))
        e = torch.exp(q * k / math.sqrt(8))
        am = e / e.sum()  # softmax over the 8 features
        expected.append(block.out.weight @ (v * am) + block.out.bias + xb)
    torch.testing.assert_close(block(x), torch.stack(expected))
    # Same parameters, the assignment's (outer-product) block: another function, so never swapped in silently.
    fused_layout = UltimusBlock(48, 8, backend="reference").double()
    fused_layout.load_state_dict(block.state_dict())
    assert (fused_layout(x) - block(x)).abs().max() > 1e-3


def test_batch_attention_block_is_the_write_ups_formula():
    torch.manual_seed(0)
    block = BatchAttentionBlock(48, 8).double().requires_grad_(False)
    x = torch.randn(6, 48, dtype=torch.float64)
    q, k, v = block.q(x), block.k(x), block.v(x)
    expected = torch.zeros(6, 48, dtype=torch.float64)
    for i in range(6):  # sample i attends to every sample j of the batch
        scores = torch.tensor([float(q[i] @ k[j]) / math.sqrt(8) for j in range(6)], dtype=torch.float64).softmax(0)
        expected[i] = block.out(sum(scores[j] * v[j] for j in range(6)))
    torch.testing.assert_close(block(x), expected)


def test_batch_attention_makes_a_prediction_depend_on_the_rest_of_the_batch():
    """The write-up's collapse: even in eval mode, a sample's logits change with its batch-mates, so the
    test accuracy depends on the test batch size (--test-batch-size)."""
    torch.manual_seed(0)
    images = torch.randn(8, 3, 32, 32)
    mixed = BatchAttentionNet().eval()
    with torch.no_grad():
        alone, in_batch, other_batch = mixed(images[:1]), mixed(images[:4])[:1], mixed(images[[0, 4, 5, 6]])[:1]
    assert (alone - in_batch).abs().max() > 1e-4 and (in_batch - other_batch).abs().max() > 1e-4
    per_sample = build_model("elementwise").eval()  # the per-sample readings do not
    with torch.no_grad():
        torch.testing.assert_close(per_sample(images[:1]), per_sample(images[:4])[:1], rtol=1e-5, atol=1e-5)


def test_vit_shapes_and_attention():
    torch.manual_seed(0)
    net = VisionTransformer().eval()
    config = net.config
    images = torch.randn(2, 3, 32, 32)
    tokens = net.embeddings(images)
    assert tokens.shape == (2, 1 + (32 // config.patch_size) ** 2, config.hidden_size) == (2, 65, 128)
    assert len(net.encoder.layer) == config.num_layers == 6
    assert net.encoder.layer[0](tokens).shape == tokens.shape
    assert net(images).shape == (2, 10)
    # F.scaled_dot_product_attention computes the write-up's softmax(q k^T / sqrt(head_dim)) v.
    attn: Attention = net.encoder.layer[0].attn
    q, k, v = (attn._heads(layer(tokens)) for layer in (attn.query, attn.key, attn.value))
    context = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(128 // 4), dim=-1) @ v
    torch.testing.assert_close(attn(tokens), attn.out(context.transpose(1, 2).flatten(2)), rtol=1e-4, atol=1e-5)
    assert VisionTransformer(ViTConfig(patch_size=8)).embeddings(images).shape == (2, 17, 128)
    with pytest.raises(ValueError, match="patch size 5"):
        VisionTransformer(ViTConfig(patch_size=5))


def test_stn_starts_at_the_identity_transform():
    torch.manual_seed(0)
    net = STNet().eval()
    images = torch.randn(3, 3, 32, 32)
    theta = net.theta(images)
    torch.testing.assert_close(theta, torch.tensor([[1.0, 0, 0], [0, 1.0, 0]]).expand(3, 2, 3))
    torch.testing.assert_close(net.transform(images), images, rtol=1e-5, atol=1e-5)
    assert net(images).shape == (3, 10)


def test_no_bias_model_has_no_bias_and_shrinks_the_image():
    net = build_model("no-bias")
    assert not [name for name, _ in net.named_parameters() if name.endswith("bias")]
    sizes = [m(torch.zeros(1, 3, 32, 32)).shape[-1] for m in (net.features[:1], net.features[:3], net.features)]
    assert sizes == [30, 28, 26]


def test_cutout16_augmentation_cuts_a_larger_hole():
    assert AUGMENTATIONS["crop-flip-cutout16"] == dict(pad=4, cutout=16)
    from model.data import augmentation

    ones = torch.ones(64, 3, 32, 32)
    holes = {}
    for name in ("crop-flip-cutout8", "crop-flip-cutout16", "crop-flip", "none"):
        x = augmentation(name)(ones, torch.Generator().manual_seed(0))
        holes[name] = (x[:, 0, 4:28, 4:28] == 0).sum((1, 2)).max().item()  # inside the crop's reach
    assert holes["none"] == 0 and holes["crop-flip"] == 0
    assert 0 < holes["crop-flip-cutout8"] < holes["crop-flip-cutout16"]


def test_ddp_run_of_the_stn_preset_with_torchrun_gloo(tmp_path):
    out = tmp_path / "ddp"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29547"]
        + [str(ROOT / "train.py"), *TINY, "--preset", "stn", "--epochs", "1", "--device", "cpu", "--out", str(out)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 process(es)" in proc.stdout and proc.stdout.count("preset stn: STNet") == 1  # rank 0 reports
    assert (out / "stn.png").is_file() and len(json.loads((out / "history.json").read_text())) == 1
