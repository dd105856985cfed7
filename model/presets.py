"""The presets: each system a write-up built, as a model and the training settings it used.

`train.py --preset NAME` takes the settings below (explicit flags still override them) and builds the model
with `build_model`; `python -m model --preset NAME` prints its layers. Settings use train.py's argument
names; a setting a preset does not name keeps train.py's default (training/cli.py, DEFAULTS). Where a
write-up was silent, the choice made here is in `choices` (and in the README's table).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional

from torch import nn

from .net import UltimusNet
from .stn import STNet
from .variants import BatchAttentionNet, ElementwiseUltimusNet
from .vit import VisionTransformer

# The model settings train.py passes to a preset's factory (the ones it accepts), with their defaults.
MODEL_DEFAULTS: Mapping[str, Any] = {"batchnorm": False, "dropout": 0.0, "conv_dropout": 0.0, "backend": "auto"}
CONV_NET_OPTIONS = ("batchnorm", "dropout", "conv_dropout")


@dataclass(frozen=True)
class Preset:
    name: str
    summary: str  # one line, for --help
    reproduces: str  # what the write-up built (its facts)
    choices: str  # what was chosen here where the write-up was silent
    reported: str  # the test accuracy the write-up reported
    factory: Callable[..., nn.Module]  # called with the model options below (and backend when `fused`)
    settings: Mapping[str, Any] = field(default_factory=dict)  # train.py settings, by argument name
    model_options: tuple = CONV_NET_OPTIONS  # the model flags (--batchnorm, ...) that apply to its model
    fused: bool = False  # whether its blocks are the assignment's math, run by the Ultimus backends
    runs_on: str = ""  # for the models that are not: what runs instead (said at startup)


DEFAULT = Preset(
    name="default",
    summary="UltimusNet as `python train.py` trains it without a preset",
    reproduces="UltimusNet: conv 3->16->32->48, pool, 4 UltimusBlocks (with skip), Linear(48, 10)",
    choices="",
    reported="",
    factory=UltimusNet,
    fused=True,
)

PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset(
            name="assignment",
            summary="the assignment's block (outer-product attention), BatchNorm + dropout after each conv, "
            "LR range test, linear one-cycle; batch 512, 24 epochs",
            reproduces="AM = softmax(Q^T K / sqrt(8)) as an 8x8 outer product, Z = V.AM, Out; BatchNorm and "
            "dropout after each convolution; Adam with an LR range test (end lr 1e-3, 200 exponential steps); "
            "OneCycleLR with pct_start 5/24, div_factor 100, final_div_factor 1000, linear annealing, two "
            "phases; batch 512; 24 epochs",
            choices="dropout 0.05 after each conv (conv, BN, ReLU, dropout); the project's block, with its skip "
            "connection (y = Out(z) + x); range test from 1e-6, pick = the LR at the smoothed loss minimum "
            "(`--lr-find-pick min`); augmentation: the project's (crop, flip, 8x8 cutout)",
            reported="46.02%",
            factory=UltimusNet,
            settings=dict(
                batchnorm=True,
                conv_dropout=0.05,
                batch_size=512,
                epochs=24,
                optimizer="adam",
                lr_find=True,
                lr_find_end=1e-3,
                lr_find_steps=200,
                lr_find_pick="min",
                pct_start=5 / 24,
                div_factor=100.0,
                final_div_factor=1000.0,
                anneal="linear",
                three_phase=False,
            ),
            fused=True,
        ),
        Preset(
            name="elementwise",
            summary="softmax(q * k / sqrt(8)) elementwise over the 8 features, z = v * am, out = Out(z) + x; "
            "no BatchNorm; max lr 0.02; batch 128 (block in plain PyTorch)",
            reproduces="am = softmax(q * k / sqrt(8)) over the 8 features (elementwise, not an outer product), "
            "z = v * am, out = Out(z) + x inside the block; no BatchNorm; 25,882 parameters; Adam + one-cycle "
            "with max lr 0.02 from a range test; batch 128; 24 epochs",
            choices="max lr 0.02 fixed (the write-up's range-test result); one-cycle otherwise at PyTorch's "
            "defaults (pct_start 0.3, cosine); augmentation: the project's",
            reported="64.43%",
            factory=ElementwiseUltimusNet,
            settings=dict(batch_size=128, epochs=24, optimizer="adam", max_lr=0.02),
            runs_on="its blocks run in plain PyTorch: elementwise softmax, not the outer-product block the fused "
            "kernels compute",
        ),
        Preset(
            name="batch-attention",
            summary="attention across the samples of a batch (B x B), one shared block applied 4 times, skip in "
            "the network; no ReLU after conv 3 (block in plain PyTorch)",
            reproduces="scores = softmax(q k^T / sqrt(8)) over the batch (B x B), z = scores v; one block with "
            "shared weights applied four times with the skip connection in the network; no ReLU after the "
            "third convolution; Adam + one-cycle (peak about 0.01)",
            choices="max lr 0.01; batch 128, 24 epochs; evaluation in batches of 128 as well (`--test-batch-size`: "
            "the accuracy depends on it); augmentation: the project's",
            reported="47.7% best, then diverged",
            factory=BatchAttentionNet,
            settings=dict(batch_size=128, test_batch_size=128, epochs=24, optimizer="adam", max_lr=0.01),
            runs_on="its block runs in plain PyTorch: attention across the batch, not the per-sample block the fused "
            "kernels compute",
        ),
        Preset(
            name="no-bias",
            summary="bias-free Ultimus linears, unpadded bias-free convs (32 -> 30 -> 28 -> 26); crop, flip, "
            "16x16 cutout; batch 512",
            reproduces="bias-free Ultimus linears and unpadded, bias-free convolutions (32 -> 30 -> 28 -> 26); "
            "25,488 parameters; random crop (pad 4), horizontal flip, coarse dropout of half the image; batch "
            "512; Adam + one-cycle; 24 epochs",
            choices="the final Linear bias-free too (that is what gives 25,488; with its bias it would be 25,498); "
            "coarse dropout = the project's cutout at size 16 (half the side), probability 1/2; max lr 0.01, "
            "one-cycle at PyTorch's defaults; the project's block, with its skip connection",
            reported="diverged to about 13%",
            factory=lambda **kw: UltimusNet(conv_bias=False, conv_padding=0, block_bias=False, head_bias=False, **kw),
            settings=dict(batch_size=512, epochs=24, optimizer="adam", max_lr=0.01, augment="crop-flip-cutout16"),
            fused=True,
        ),
        Preset(
            name="stn",
            summary="Spatial Transformer Network (PyTorch tutorial) in front of a small CNN; SGD lr 0.01; "
            "batch 256, 50 epochs; writes stn.png",
            reproduces="a localisation network regressing a 2x3 affine matrix initialised to the identity, "
            "affine_grid + grid_sample, in front of a small CNN; 50 epochs, batch 256, lr 0.01 (the "
            "tutorial's SGD)",
            choices="the tutorial's layers with 3 input channels (localisation conv 3->8 7x7, pool, conv 8->10 5x5, "
            "pool, Linear(160, 32), Linear(32, 6); classifier conv 3->10 5x5, conv 10->20 5x5, Linear(500, 50), "
            "Linear(50, 10), with its dropouts); plain SGD at a constant lr 0.01, no momentum; no augmentation "
            "(the tutorial's)",
            reported="60.18%",
            factory=STNet,
            settings=dict(
                batch_size=256,
                epochs=50,
                optimizer="sgd",
                momentum=0.0,
                schedule="constant",
                max_lr=0.01,
                augment="none",
            ),
            model_options=(),
            runs_on="all plain PyTorch: no Ultimus block",
        ),
        Preset(
            name="vit",
            summary="a small Vision Transformer (ViT-pytorch's classes): patch 4, width 128, 6 layers, 4 heads, "
            "MLP 512; Adam, one-cycle to 1e-3",
            reproduces="ViT-pytorch's Embeddings (patch embedding, class token, position embeddings), Attention, "
            "MLP, Block (pre-LayerNorm, two residuals) and Encoder, sized for 32x32 images, with "
            "F.scaled_dot_product_attention",
            choices="patch 4 (64 patches + class token), width 128, 6 layers, 4 heads of 32, MLP 512, dropout 0.1, "
            "attention dropout 0; Adam + one-cycle (PyTorch's defaults: 30% warm-up, cosine) to 1e-3; batch 128, "
            "24 epochs; augmentation: the project's",
            reported="(none reported)",
            factory=VisionTransformer,
            settings=dict(batch_size=128, epochs=24, optimizer="adam", max_lr=1e-3),
            model_options=(),
            runs_on="all plain PyTorch: no Ultimus block",
        ),
    )
}


def get_preset(name: Optional[str]) -> Preset:
    """The preset called `name`; None is the default run's model (no preset)."""
    if name is None or name == DEFAULT.name:
        return DEFAULT
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}") from None


def build_model(name: Optional[str], **options) -> nn.Module:
    """The model of preset `name` (None: the default UltimusNet). `options` (batchnorm, dropout,
    conv_dropout, backend) override the preset's own; those its model does not have are ignored (train.py
    refuses them when given explicitly)."""
    preset = get_preset(name)
    accepted = preset.model_options + (("backend",) if preset.fused else ())
    kwargs = {key: preset.settings.get(key, MODEL_DEFAULTS[key]) for key in accepted}
    kwargs.update({key: value for key, value in options.items() if key in accepted and value is not None})
    return preset.factory(**kwargs)


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
