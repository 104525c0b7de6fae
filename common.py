"""The engine shared by every recipe script: model, data, augmentation, loss, optimizer,
schedule, training loop, evaluation, checkpoints and the command line.

DEFAULTS (every recipe key) comes first; then the sections follow the data: model -> data ->
augment (-> its device port) -> sampler -> loss -> optim -> schedule -> EMA -> engine -> demo
data -> CLI -> the README's recipe table. Each ingredient says where its behaviour comes from:
"timm" is pytorch-image-models (the code the ResNet strikes back numbers were produced with),
"tv" is torchvision's references/classification, "RSB" is the ResNet strikes back paper.
"""
import argparse
import collections
import contextlib
import datetime
import difflib
import functools
import importlib.util
import io
import itertools
import json
import math
import os
import pickle
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import traceback
import warnings
from copy import deepcopy
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter, ImageOps

MIN_TORCH = (2, 3)  # torch.amp.GradScaler(device) and CPU fp16 autocast; requirements.txt
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class UserError(Exception):
    """A problem with the user's input: printed as one line, no traceback."""


# Every recipe key at its default: "off" for an ingredient (0, None), the timm behaviour for a
# choice. A recipe script lists only what its recipe sets (and the zeros its paper states);
# --print-recipe shows them all, resolved. "timm" / "tv" name the
# reference implementation a choice follows.
DEFAULTS = dict(
    recipe=None,                # the recipe's name (a1 ... rs); every script sets it
    model=None,                 # a key of MODELS; every script sets it
    epochs=None,                # every script sets it
    warmup_epochs=0,            # epochs of linear warmup
    batch_size=None,            # the global batch the lr is for; every script sets it
    train_size=224,             # side of the random resized crop
    eval_size=224,              # side of the evaluation center crop
    crop_pct=None,              # timm: resize to floor(eval_size / crop_pct) before the crop
    eval_resize=None,           # tv: the short side before the crop; None: from crop_pct, and
                                # when set, crop_pct is derived from it
    interpolation="bilinear",   # resampling of train crops and eval resize
    opt=None,                   # lamb | rmsproptf | sgd | adamp; every script sets it
    lr=None,                    # peak lr for batch_size; every script sets it
    weight_decay=0.0,           # L2 in the gradient (SGD, RMSpropTF) or decoupled (LAMB, AdamP)
    wd_groups="timm",           # who skips decay: timm (all ndim <= 1) | tv (norm layers only)
                                # | all (none: tv's train.py without --norm-weight-decay)
    momentum=None,              # SGD / RMSpropTF momentum
    nesterov=None,              # Nesterov momentum: SGD; AdamP's is on unless False
    opt_eps=None,               # optimizer epsilon (None: the optimizer's own)
    opt_betas=None,             # Adam-family betas
    sched="cosine",             # cosine | step
    sched_per_step=False,       # lr updated every step (RS), not once an epoch (timm, tv)
    warmup_lr=None,             # timm: the warmup starts at this lr
    warmup_factor=None,         # tv: the warmup starts at lr x this
    warmup_prefix=False,        # the decay starts after the warmup (tv, RS), not at epoch 0
    min_lr=None,                # the cosine's floor (None: 0)
    decay_rate=None,            # step: lr x decay_rate every decay_epochs
    decay_epochs=None,
    lr_noise=None,              # timm: lr noise in epochs [start, end) x epochs, never epoch 0
    lr_noise_pct=0.67,          # timm: noise n ~ N(0, std) redrawn until |n| < pct
    lr_noise_std=1.0,
    loss="ce",                  # ce | bce
    label_smoothing=0.0,        # CE and BCE; applied to the targets before Mixup/CutMix
    bce_target_thresh=None,     # timm BCE: targets above it become 1
    dropout=0.0,                # before the classifier
    drop_path=0.0,              # stochastic depth, the last block's rate
    zero_init_last=True,        # zero gamma of each block's last BN (timm; tv: False)
    repeated_aug=0,             # repeats per image (DeiT's sampler); 0: off
    clip=None,                  # gradient clipping {"mode": "agc" | "norm", "value": v}
    auto_augment=None,          # timm's "rand-..." RandAugment, or "ta_wide" (tv)
    mixup=0.0,                  # Mixup alpha; 0: off
    cutmix=0.0,                 # CutMix alpha; 0: off
    mixup_style="timm",         # timm: flipped partner, its CutMix box, erase after mixing |
                                # tv: rolled partner, its box, erase before
    reprob=0.0,                 # random erasing probability; 0: off
    recount=1,                  # pixel erasing: 1 to recount boxes an image (timm max_count)
    remode="pixel",             # pixel (timm's erasing: normal noise) | tv (its RandomErasing: 0)
    ema_decay=None,             # EMA of the weights; None: off
    ema_every=1,                # an EMA update every n optimizer steps
    ema_style="timm",           # timm: fixed decay | tv: decay adjusted to batch and epochs,
                                # copies in warmup | tf: min(decay, (1 + n) / (10 + n)) (RS)
    amp=False,                  # autocast on CUDA (bf16 or fp16); --amp-dtype overrides it
    paper_top1=None,            # the published top-1 and where it is published
    top1_source=None,
)
REQUIRED = ("recipe", "model", "epochs", "batch_size", "opt", "lr")
CHOICES = dict(opt=("lamb", "rmsproptf", "sgd", "adamp"), wd_groups=("timm", "tv", "all"),
               sched=("cosine", "step"), loss=("ce", "bce"), mixup_style=("timm", "tv"),
               ema_style=("timm", "tv", "tf"))  # a typo is an error, never a silent default


def full_recipe(recipe):
    """DEFAULTS updated with a script's recipe: every key, in DEFAULTS' order."""
    unknown = [k for k in recipe if k not in DEFAULTS]
    if unknown:
        close = difflib.get_close_matches(unknown[0], list(DEFAULTS), n=1)
        raise UserError(f"unknown recipe key {unknown[0]!r}"
                        + (f"; did you mean {close[0]!r}?" if close else ""))
    missing = [k for k in REQUIRED if recipe.get(k) is None]
    if missing:
        raise UserError(f"the recipe sets no {', '.join(missing)}")
    return {**DEFAULTS, **recipe}


# Every random stream of a run is seeded from (seed, stream, ...) through NumPy's SeedSequence,
# never seed + epoch: with that, --seed 1 replays the data orders of --seed 0 one epoch late
# (issue 15). The streams, by what they shape:
SEED_MODEL = 1    # the initial weights: the same on every rank
SEED_ORDER = 2    # the train order of each epoch (samplers); the same on every rank
SEED_BATCH = 3    # the augmentation of each batch in the loader (crop, flip, RandAugment, ...)
SEED_STEP = 4     # per epoch and rank: Mixup/CutMix, random erasing, drop path, dropout
SEED_NOISE = 5    # timm's lr noise (B), seeded base + epoch as timm


def seed_for(seed, *keys):
    """A 63-bit seed for one stream: SeedSequence over (seed, *keys) of non-negative ints."""
    state = np.random.SeedSequence([int(seed), *map(int, keys)]).generate_state(2, np.uint64)
    return int(state[0] >> np.uint64(1))


def seed_all(seed, cpu_only=False):
    """Seed Python's, NumPy's global and torch's generators (CPU, and every GPU unless
    cpu_only), each from its own seed derived from `seed`. One value for all would make two of
    them one stream: random.seed(n) and np.random.seed([n's 32-bit words]) both run MT19937's
    init_by_array on the same key, and then draw the same numbers."""
    py, npy, th = (seed_for(seed, k) for k in (1, 2, 3))
    random.seed(py)
    np.random.seed([npy & 0xFFFFFFFF, npy >> 32])
    if cpu_only:
        torch.default_generator.manual_seed(th)
    else:
        torch.manual_seed(th)


@contextlib.contextmanager
def _own_rng(keep):
    """With keep=True, the Python / NumPy / torch CPU streams are restored on exit."""
    if not keep:
        yield
        return
    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])


# ==================================================================================================
# Model: ResNet (He et al. 2015) with the torchvision/timm layout, so their state dicts load as-is
# ==================================================================================================

def drop_path(x, rate, training):
    """Stochastic depth: drop the whole residual branch of a sample, rescale the survivors."""
    if rate == 0.0 or not training:
        return x
    keep = 1.0 - rate
    mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
    return x * mask.div_(keep)


class SqueezeExcite(nn.Module):
    """Squeeze-and-excitation (Hu et al. 2017) with timm's SEModule layout: 1x1 convs with bias
    named fc1/fc2, ReLU between, sigmoid gate."""

    def __init__(self, channels, ratio):
        super().__init__()
        # timm make_divisible(channels * ratio, 8, round_limit=0): nearest multiple of 8, >= 8
        hidden = max(8, int(channels * ratio + 4) // 8 * 8)
        self.fc1 = nn.Conv2d(channels, hidden, 1)
        self.fc2 = nn.Conv2d(hidden, channels, 1)

    def forward(self, x):
        s = F.relu(self.fc1(x.mean((2, 3), keepdim=True)), inplace=True)
        return x * torch.sigmoid(self.fc2(s))


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes, planes, stride=1, downsample=None, drop_path_rate=0.0,
                 groups=1, base_width=64, se_ratio=0.0):
        super().__init__()
        if groups != 1 or base_width != 64:
            raise ValueError("BasicBlock has no groups or base width (as tv and timm)")
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.se = SqueezeExcite(planes, se_ratio) if se_ratio else None
        self.downsample = downsample
        self.drop_path_rate = drop_path_rate

    def zero_init_last(self):
        nn.init.zeros_(self.bn2.weight)

    def forward(self, x):
        shortcut = x if self.downsample is None else self.downsample(x)
        x = F.relu(self.bn1(self.conv1(x)), inplace=True)
        x = self.bn2(self.conv2(x))
        if self.se is not None:
            x = self.se(x)
        x = drop_path(x, self.drop_path_rate, self.training)
        return F.relu(x + shortcut, inplace=True)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes, planes, stride=1, downsample=None, drop_path_rate=0.0,
                 groups=1, base_width=64, se_ratio=0.0):
        super().__init__()
        # tv/timm: ResNeXt-50 32x4d has 32 groups of 4 channels in stage 1 (width 128), Wide
        # ResNet-50-2 base width 128 (width 128); plain ResNet width == planes
        width = int(planes * base_width / 64) * groups
        self.conv1 = nn.Conv2d(inplanes, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        # stride on the 3x3 conv ("ResNet v1.5"), as torchvision and timm
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, groups=groups, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        # timm (and the TF ResNet-RS code): SE on the expanded output, after bn3, before drop path
        self.se = SqueezeExcite(planes * 4, se_ratio) if se_ratio else None
        self.downsample = downsample
        self.drop_path_rate = drop_path_rate

    def zero_init_last(self):
        nn.init.zeros_(self.bn3.weight)

    def forward(self, x):
        shortcut = x if self.downsample is None else self.downsample(x)
        x = F.relu(self.bn1(self.conv1(x)), inplace=True)
        x = F.relu(self.bn2(self.conv2(x)), inplace=True)
        x = self.bn3(self.conv3(x))
        if self.se is not None:
            x = self.se(x)
        x = drop_path(x, self.drop_path_rate, self.training)
        return F.relu(x + shortcut, inplace=True)


def projection(inplanes, outplanes, stride, avg_down):
    """The shortcut of a block that changes shape: strided 1x1 conv + BN, or with avg_down
    (ResNet-D, Bag of Tricks §4.2) a 2x2 average pool then a 1x1 conv + BN, so the shortcut
    sees every pixel instead of one in four."""
    if not avg_down:
        return nn.Sequential(nn.Conv2d(inplanes, outplanes, 1, stride, bias=False),
                             nn.BatchNorm2d(outplanes))
    # timm: ceil_mode keeps the last row/column of an odd map (matching the strided 3x3 conv of
    # the main path) and averages it alone, as TF's "SAME" pooling of the ResNet-RS weights
    pool = (nn.AvgPool2d(2, stride, ceil_mode=True, count_include_pad=False) if stride > 1
            else nn.Identity())
    return nn.Sequential(pool, nn.Conv2d(inplanes, outplanes, 1, bias=False),
                         nn.BatchNorm2d(outplanes))


class ResNet(nn.Module):
    """stem "plain": 7x7 conv; "deep": ResNet-C/D three 3x3 convs 32 -> 32 -> 64 (timm
    stem_type="deep", stem_width=32). stem_pool "max": 3x3 max pool; "conv": ResNet-RS's stride-2
    3x3 conv + BN + ReLU. avg_down: ResNet-D shortcuts. groups / base_width: ResNeXt and wide
    bottlenecks. se_ratio: squeeze-excite in every block (0 = none). zero_init_last=False keeps
    the last BN gamma of each block at one (tv's zero_init_residual=False)."""

    def __init__(self, block, layers, num_classes=1000, dropout=0.0, drop_path_rate=0.0,
                 stem="plain", stem_pool="max", avg_down=False, groups=1, base_width=64,
                 se_ratio=0.0, zero_init_last=True):
        super().__init__()
        self.num_classes = num_classes
        self.dropout = dropout
        if stem == "plain":
            self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        elif stem == "deep":
            # one Sequential so the keys are timm's conv1.0 / .1 / .3 / .4 / .6
            self.conv1 = nn.Sequential(
                nn.Conv2d(3, 32, 3, 2, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU(inplace=True),
                nn.Conv2d(32, 32, 3, 1, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU(inplace=True),
                nn.Conv2d(32, 64, 3, 1, 1, bias=False))
        else:
            raise ValueError(f"stem must be 'plain' or 'deep', not {stem!r}")
        self.bn1 = nn.BatchNorm2d(64)
        # timm keeps the name maxpool for the conv that replaces it (keys maxpool.0 / .1)
        if stem_pool == "max":
            self.maxpool = nn.MaxPool2d(3, 2, 1)
        elif stem_pool == "conv":
            self.maxpool = nn.Sequential(nn.Conv2d(64, 64, 3, 2, 1, bias=False),
                                         nn.BatchNorm2d(64), nn.ReLU(inplace=True))
        else:
            raise ValueError(f"stem_pool must be 'max' or 'conv', not {stem_pool!r}")
        inplanes, index, total = 64, 0, sum(layers)
        for stage, (depth, planes) in enumerate(zip(layers, (64, 128, 256, 512))):
            blocks = []
            for b in range(depth):
                stride = 2 if stage > 0 and b == 0 else 1
                downsample = None
                if b == 0 and (stride != 1 or inplanes != planes * block.expansion):
                    downsample = projection(inplanes, planes * block.expansion, stride, avg_down)
                # timm: block i of N drops with rate drop_path * i / (N - 1)
                rate = drop_path_rate * index / max(total - 1, 1)
                blocks.append(block(inplanes, planes, stride, downsample, rate,
                                    groups, base_width, se_ratio))
                inplanes, index = planes * block.expansion, index + 1
            self.add_module(f"layer{stage + 1}", nn.Sequential(*blocks))
        self.fc = nn.Linear(512 * block.expansion, num_classes)
        # timm: every conv, the SE 1x1 convs included (their biases keep PyTorch's default)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        if zero_init_last:  # RSB / timm: zero gamma of the last BN of a block
            for m in self.modules():
                if hasattr(m, "zero_init_last"):
                    m.zero_init_last()

    def forward(self, x):
        x = self.maxpool(F.relu(self.bn1(self.conv1(x)), inplace=True))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        x = F.dropout(x, self.dropout, self.training)  # timm: dropout before the classifier
        return self.fc(x)


# ResNet-RS (Bello et al. 2021, timm resnetrs*): ResNet-D stem and shortcuts, the stem max pool
# replaced by a strided conv, SE with ratio 1/4 in every block
RESNET_RS = dict(stem="deep", stem_pool="conv", avg_down=True, se_ratio=0.25)

# name -> (block, blocks per stage, ResNet options); names and layouts are timm's
MODELS = {
    "resnet18": (BasicBlock, (2, 2, 2, 2), {}),
    "resnet34": (BasicBlock, (3, 4, 6, 3), {}),
    "resnet50": (Bottleneck, (3, 4, 6, 3), {}),
    "resnet101": (Bottleneck, (3, 4, 23, 3), {}),
    "resnet152": (Bottleneck, (3, 8, 36, 3), {}),
    "resnet200": (Bottleneck, (3, 24, 36, 3), {}),
    "resnet50d": (Bottleneck, (3, 4, 6, 3), dict(stem="deep", avg_down=True)),
    "seresnet50": (Bottleneck, (3, 4, 6, 3), dict(se_ratio=1 / 16)),  # timm SEModule default
    "resnext50_32x4d": (Bottleneck, (3, 4, 6, 3), dict(groups=32, base_width=4)),
    "wide_resnet50_2": (Bottleneck, (3, 4, 6, 3), dict(base_width=128)),
    "resnetrs50": (Bottleneck, (3, 4, 6, 3), RESNET_RS),
    "resnetrs101": (Bottleneck, (3, 4, 23, 3), RESNET_RS),
    "resnetrs152": (Bottleneck, (3, 8, 36, 3), RESNET_RS),
    "resnetrs200": (Bottleneck, (3, 24, 36, 3), RESNET_RS),
    # RS Table 1 row 9: ResNet-200 + SE (ratio 1/4, RS's) before ResNet-D: the plain stem and
    # shortcuts (timm has no such model; its seresnet* use 1/16)
    "seresnet200_rs": (Bottleneck, (3, 24, 36, 3), dict(se_ratio=0.25)),
    "resnetrs270": (Bottleneck, (4, 29, 53, 4), RESNET_RS),
    "resnetrs350": (Bottleneck, (4, 36, 72, 4), RESNET_RS),
    "resnetrs420": (Bottleneck, (4, 44, 87, 4), RESNET_RS),
}


def create_model(name, num_classes=1000, dropout=0.0, drop_path=0.0, zero_init_last=True):
    if name not in MODELS:
        raise UserError(f"unknown model {name!r}; known: {', '.join(MODELS)}")
    block, layers, options = MODELS[name]
    return ResNet(block, layers, num_classes, dropout, drop_path, zero_init_last=zero_init_last,
                  **options)


# Other codes' weights: which ResNet a torchvision / timm state dict is, and loading it

def model_name_from_state_dict(sd):
    """Which of MODELS a ResNet state dict (ours, torchvision's, timm's) belongs to: the one with
    exactly its keys and shapes, whatever the number of classes."""
    def layout(state):
        return {k: tuple(v.shape) for k, v in state.items() if not k.startswith("fc.")}

    bottleneck = "layer1.0.conv3.weight" in sd
    depths = tuple(len({k.split(".")[1] for k in sd if k.startswith(f"layer{i}.")})
                   for i in range(1, 5))
    wanted, same_depths = layout(sd), []
    for name, (block, layers, options) in MODELS.items():
        if (block is Bottleneck) != bottleneck or tuple(layers) != depths:
            continue
        same_depths.append(name)
        # on the meta device: the layout without allocating or initialising any weights
        with torch.device("meta"):
            candidate = ResNet(block, layers, 1, **options)
        if layout(candidate.state_dict()) == wanted:
            return name
    if same_depths:
        raise UserError(f"checkpoint has the blocks per stage {depths} of "
                        f"{', '.join(same_depths)} but not their layers (stem, shortcut, SE or "
                        f"width differ)")
    raise UserError(f"checkpoint is not a ResNet this repo knows (blocks per stage {depths})")


def load_weights(model, sd, source="checkpoint"):
    """load_state_dict(strict) with a one-line message naming what does not fit."""
    sd = {k[len("module."):] if k.startswith("module.") else k: v for k, v in sd.items()}
    sd = {k[len("_orig_mod."):] if k.startswith("_orig_mod.") else k: v for k, v in sd.items()}
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shapes = [f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}"
              for k in own if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys ({', '.join(missing[:3])}...)")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys ({', '.join(unexpected[:3])}...)")
        if shapes:
            parts.append(f"{len(shapes)} shape mismatches ({'; '.join(shapes[:2])})")
        raise UserError(f"{source} does not fit the model: {', '.join(parts)}")
    model.load_state_dict(sd)


# ==================================================================================================
# Data: ImageFolder (train/ and val/ with one folder per class), PIL decoding, uint8 output
# ==================================================================================================

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
INTERPOLATION = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "nearest": Image.NEAREST}


def find_images(root):
    """[(path, class_index)], classes sorted by name as tv's ImageFolder."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"data folder {root} does not exist")
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir())
    if not classes:
        raise UserError(f"data folder {root} has no class folders (expected {root}/<class>/<image>)")
    samples = []
    for index, name in enumerate(classes):
        files = []
        for folder, _, names in sorted(os.walk(root / name, followlinks=True)):
            files += [os.path.join(folder, n) for n in sorted(names)
                      if n.lower().endswith(IMG_EXTENSIONS)]
        if not files:
            raise UserError(f"class folder {root / name} has no images")
        samples += [(f, index) for f in files]
    return samples, classes


class SampleTable:
    """A folder's [(path, class index)] as two NumPy arrays (paths relative to the folder, as
    bytes). Forked loader workers share it: a Python list of 1.28M tuples is copied into every
    worker page by page as reference counts and the garbage collector touch it (about 35 MB a
    worker per 200k files, bench.py host: some 220 MB a worker on ImageNet). It pickles in one
    piece, for rank 0 to broadcast its listing."""

    def __init__(self, root, samples):
        self.root = str(Path(root))  # as find_images writes it: the paths start with it
        prefix = os.path.join(self.root, "")
        names = [os.fsencode(p[len(prefix):] if p.startswith(prefix) else p) for p, _ in samples]
        # one buffer and offsets: a fixed-width array would give every path the longest's size
        self.names = np.frombuffer(b"".join(names), dtype=np.uint8)
        self.offsets = np.cumsum([0] + [len(n) for n in names], dtype=np.int64)
        self.targets = np.array([t for _, t in samples], dtype=np.int64)

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        name = self.names[self.offsets[i]:self.offsets[i + 1]].tobytes()
        return os.path.join(self.root, os.fsdecode(name)), int(self.targets[i])

    def __iter__(self):
        return (self[i] for i in range(len(self)))


def list_folder(root):
    """(SampleTable, classes) of an ImageFolder root; the listing ImageFolder takes."""
    samples, classes = find_images(root)
    return SampleTable(root, samples), classes


class Samples(list):
    """A batch's samples, and the unreadable images skipped to make it ("path: reason")."""
    skipped = ()


class ImageFolder(torch.utils.data.Dataset):
    """With skip_bad=True an unreadable image (corrupt or truncated, not an image, empty) is
    replaced by the next readable one and noted in the batch (Samples.skipped): training
    reports each path and counts them per epoch, and one bad file does not end a 600-epoch
    run. skip_bad=False (evaluation, --bad-images error) raises a one-line UserError."""

    def __init__(self, root, transform, skip_bad=False, listing=None):
        self.samples, self.classes = listing or list_folder(root)
        self.root, self.transform, self.skip_bad = str(root), transform, skip_bad
        self.skipped = []

    def __len__(self):
        return len(self.samples)

    def __getitems__(self, keys):
        """A batch. Training samplers send (index, batch seed) keys: the random streams that
        augment the batch (Python, NumPy, torch) are seeded from it first, so a batch's
        augmentation depends on (seed, epoch, batch), not on which worker made it or what it
        made before. In the main process (workers 0) its own streams are put back after."""
        self.skipped = []
        if not keys or not isinstance(keys[0], tuple):
            batch = Samples(self[i] for i in keys)
        else:
            with _own_rng(torch.utils.data.get_worker_info() is None):
                seed_all(keys[0][1], cpu_only=True)
                batch = Samples(self[i] for i, _ in keys)
        batch.skipped, self.skipped = self.skipped, []
        return batch

    def __getitem__(self, index):
        for attempt in range(len(self.samples)):
            path, target = self.samples[(index + attempt) % len(self.samples)]
            try:
                # the transform gets the file opened but not decoded: it decodes with rgb(), so
                # that --fast-decode can ask libjpeg for a smaller image first
                with Image.open(path) as img:
                    return self.transform(img), target
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
                reason = str(e).splitlines()[0] if str(e) else type(e).__name__
                if not self.skip_bad:
                    raise UserError(f"cannot read image {path}: {reason}") from None
                self.skipped.append(f"{path}: {reason}")
        raise UserError(f"no image in {self.root} can be read")


def rgb(img):
    """The decoded RGB image of an opened PIL image (tv's and timm's loaders: convert("RGB"),
    without their copy when the file is RGB already). Grey, CMYK, palette and RGBA become RGB
    as there (alpha dropped); 16-bit grey is scaled to 8 bits, where convert() would clip
    everything above 255 to white."""
    img.load()
    if img.mode == "RGB":
        return img
    if img.mode.startswith("I"):  # I;16, I;16B, I (16-bit PNGs)
        return Image.fromarray((np.asarray(img).astype(np.int64) >> 8).clip(0, 255).astype(
            np.uint8), "L").convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")  # what Pillow asks for; the same colours, without its warning
    return img.convert("RGB")


def to_uint8(img):
    """HWC uint8 array of a PIL image; collate() turns a list of them into an NCHW batch."""
    return np.asarray(rgb(img), dtype=np.uint8)


def collate(batch):
    """uint8 NCHW batch (channels_last memory, free to make) and int64 targets; with
    --device-aug also the ops drawn for each image, float64 [N, slots, 7]; last, when the
    dataset skipped unreadable images for this batch, their list ("path: reason"). With
    --decode device the images are an EncodedBatch, decoded by to_device."""
    samples, ops = [b[0] for b in batch], None
    if isinstance(samples[0], Encoded):
        images = EncodedBatch(samples)
        ops = None if samples[0].ops is None else [s.ops for s in samples]
    else:
        if isinstance(samples[0], tuple):
            samples, ops = zip(*samples)
        images = torch.from_numpy(np.stack(samples)).permute(0, 3, 1, 2)
    target = torch.tensor([b[1] for b in batch], dtype=torch.int64)
    out = (images, target) if ops is None else (images, target, torch.from_numpy(np.stack(ops)))
    skipped = getattr(batch, "skipped", ())
    return out + (list(skipped),) if skipped else out


def random_resized_crop_params(width, height, scale, ratio, rng=random):
    """(top, left, h, w) as tv's RandomResizedCrop.get_params; timm draws from `random`."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = rng.uniform(*scale) * area
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if w <= width and h <= height:
            return rng.randint(0, height - h), rng.randint(0, width - w), h, w
    in_ratio = width / height  # fallback: the central crop with the aspect clamped to `ratio`
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def resize_short(img, size, interpolation):
    """Short side to `size`, long side int(size * long / short), as tv's Resize(int)."""
    w, h = img.size
    if w <= h:
        new = (size, int(size * h / w))
    else:
        new = (int(size * w / h), size)
    return img.resize(new, INTERPOLATION[interpolation])


def center_crop(img, size):
    w, h = img.size
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    return img.crop((left, top, left + size, top + size))


def decode_reduction(width, height, crop_w, crop_h, size):
    """--fast-decode: the largest of 8, 4, 2 by which a JPEG can be shrunk while decoding (libjpeg
    DCT scaling) so that the crop still has at least `size` pixels each way; 1 if none."""
    for r in (8, 4, 2):
        if crop_w >= r * size and crop_h >= r * size and width >= r * r and height >= r * r:
            return r
    return 1


class TrainTransform:
    """timm's transforms_imagenet_train with the prefetcher: RandomResizedCrop, flip, then
    RandAugment (a timm "rand-..." string) or TrivialAugment Wide ("ta_wide", tv's recipe), then
    uint8 out; normalisation and erasing happen on the device. Draws as timm: the crop from
    `random`, the flip from torch (tv's RandomHorizontalFlip), RandAugment's ops from numpy.

    fast_decode: the crop is drawn from the file's header before decoding, and a JPEG whose crop
    is at least 2x the output size is decoded at 1/2, 1/4 or 1/8 scale (PIL draft), then the same
    crop is resized from it. Same random draws and crop geometry; the pixels differ a little
    (libjpeg's scaled IDCT instead of the first part of the bicubic downscale).

    device_aug: RandAugment / TrivialAugment ops are drawn here, as always, but not applied:
    the image comes back with them, (uint8 HWC, encode_ops), and on_device applies them to the
    batch (device_augment), to the same pixels.

    decode="device" (--decode device): the worker does no pixel work for a baseline RGB JPEG. It
    reads the file's bytes and draws the crop, the flip and the ops from the header's size,
    the same calls in the same order as above, and sends an Encoded record; decode_batch then
    decodes the batch where it trains (nvJPEG on a GPU), crops, resizes and flips. Other files
    (progressive, CMYK, grey, PNG, ...) are done here with Pillow as above; their ops are sent
    too (device_aug is implied)."""

    def __init__(self, size, interpolation="bicubic", auto_augment=None, hflip=0.5,
                 scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), mean=IMAGENET_MEAN,
                 fast_decode=False, device_aug=False, decode="pillow"):
        if decode not in ("pillow", "device"):
            raise UserError(f"--decode {decode}: choose pillow or device")
        if decode == "device" and fast_decode:
            raise UserError("--fast-decode is for the Pillow path; --decode device decodes "
                            "full-size JPEGs on the device: choose one")
        if decode == "device" and interpolation not in ("bilinear", "bicubic"):
            raise UserError(f"--decode device resizes with bilinear or bicubic only, not "
                            f"{interpolation}")
        self.size, self.interpolation, self.hflip = size, interpolation, hflip
        self.scale, self.ratio, self.fast_decode, self.decode = scale, ratio, fast_decode, decode
        self.trivial_augment = auto_augment == "ta_wide"
        self.rand_augment = (parse_rand_augment(auto_augment)
                             if auto_augment and not self.trivial_augment else None)
        # timm: RandAugment fills with the dataset mean and resamples with the train
        # interpolation; tv's recipe passes TrivialAugment no fill: black
        self.fill = ((0, 0, 0) if self.trivial_augment
                     else tuple(min(255, round(255 * m)) for m in mean))
        self.device_aug = ((device_aug or decode == "device")
                           and (self.trivial_augment or self.rand_augment is not None))

    def __call__(self, img):
        width, height = img.size  # from the header: nothing is decoded yet
        box = random_resized_crop_params(width, height, self.scale, self.ratio)
        flip = self.hflip > 0 and bool(torch.rand(1) < self.hflip)
        if self.decode == "device" and device_decodable(img):
            img.fp.seek(0)
            data = np.frombuffer(img.fp.read(), dtype=np.uint8)
            return Encoded(data, box, flip, None, self.draw_ops(), img.filename, (height, width))
        img = self.render(img, box, flip)
        if self.decode == "device":
            return Encoded(None, box, flip, to_uint8(img), self.draw_ops(), None, None)
        if self.device_aug:
            return to_uint8(img), self.draw_ops()
        if self.trivial_augment:
            img = trivial_augment(img, INTERPOLATION[self.interpolation], self.fill)
        elif self.rand_augment:
            img = rand_augment(img, self.rand_augment, self.fill,
                               INTERPOLATION[self.interpolation])
        return to_uint8(img)

    def render(self, img, box, flip):
        """The crop `box` (top, left, h, w) of an opened image, resized, flipped: no draws."""
        (top, left, h, w), (width, height) = box, img.size
        resample, out = INTERPOLATION[self.interpolation], (self.size, self.size)
        r = decode_reduction(width, height, w, h, self.size) if self.fast_decode else 1
        if r > 1:  # a no-op for other formats and for an image already decoded
            img.draft("RGB", (width // r, height // r))
            r = width / img.size[0] if img.size != (width, height) else 1
        if r > 1:  # the same crop in the reduced image, as a float box
            r = 2 ** round(math.log2(r))  # the size was rounded up from width / r
            img = rgb(img).resize(out, resample, box=(left / r, top / r, (left + w) / r,
                                                      (top + h) / r))
        else:
            img = rgb(img).crop((left, top, left + w, top + h)).resize(out, resample)
        return img.transpose(Image.FLIP_LEFT_RIGHT) if flip else img

    def draw_ops(self):
        """--device-aug: this image's RandAugment / TrivialAugment ops (encode_ops), drawn as
        rand_augment / trivial_augment draw them; None when the recipe has none."""
        if not self.device_aug:
            return None
        size = (self.size, self.size)
        if self.trivial_augment:
            return encode_ops([trivial_augment_primitive(*trivial_augment_draw(), size)], 1)
        return encode_ops([rand_augment_primitive(name, m, size)
                           for name, m in rand_augment_draws(self.rand_augment)],
                          self.rand_augment["n"])

    def on_device(self, images, ops):
        """The ops sent with a device_aug batch, applied on the images' device."""
        return device_augment(images, ops, INTERPOLATION[self.interpolation], self.fill)

    def decode_batch(self, batch, target, device, bad, skip_bad=True):
        """--decode device: an EncodedBatch -> (uint8 NCHW on `device`, target). The JPEGs are
        decoded in one call (nvJPEG on CUDA, libjpeg-turbo on a CPU); if that call fails, image
        by image; an image the device cannot decode is decoded with Pillow from its bytes (same
        crop and flip). One neither can read is replaced by another image of the batch, target
        and all ("path: reason" appended to `bad`), or with skip_bad=False raises UserError."""
        images = torch.empty((batch.n, 3, self.size, self.size), dtype=torch.uint8,
                             device=device)
        if len(batch.decoded):
            images[batch.decoded.to(device)] = batch.pixels.to(device, non_blocking=True)
        failed = []
        for j, (img, why) in enumerate(decode_jpegs(batch.chunks(), device)):
            box, i = batch.boxes[j].tolist(), int(batch.coded[j])
            if img is not None and tuple(img.shape[1:]) != batch.shapes[j]:
                img, why = None, f"decoded {tuple(img.shape[1:])}, header {batch.shapes[j]}"
            try:
                if img is None:
                    with Image.open(io.BytesIO(batch.chunk(j).numpy().tobytes())) as opened:
                        img = torch.from_numpy(np.array(self.render(opened, box, False)))
                    img, box = img.permute(2, 0, 1).to(device), (0, 0, self.size, self.size)
                images[i] = resized_crop(img, box, self.size, self.interpolation)
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
                reason = str(e).splitlines()[0] if str(e) else type(e).__name__
                failed.append((i, f"{batch.paths[j]}: {reason} (and on the device: {why})"))
        flipped = batch.coded[batch.flips].to(device, non_blocking=True)
        images[flipped] = images[flipped].flip(-1)
        if failed:
            if not skip_bad:
                raise UserError(f"cannot read image {failed[0][1]}")
            bad.extend(message for _, message in failed)
            target = replace_unreadable(images, target, failed)
        return images, target


def replace_unreadable(images, target, failed):
    """The images at the batch positions of `failed` [(position, "path: reason")] replaced, in
    `images` and `target`, by the next readable one of the batch (cyclically): the decode ran
    in the main process, after the workers' choice of files, so the Pillow path's 'next file'
    is not at hand."""
    lost = [i for i, _ in failed]
    good = [i for i in range(len(images)) if i not in set(lost)]
    if not good:
        raise UserError(f"no image of a batch can be read: {failed[0][1]}")
    target = target.clone()
    for i in lost:
        src = next((g for g in good if g > i), good[0])
        images[i], target[i] = images[src], target[src]
    return target


def device_decodable(img):
    """Whether an opened file goes to the device decoder: a sequential JPEG with 3 channels
    (YCbCr), opened from a path. Progressive, CMYK / YCCK and grey JPEGs and other formats stay
    on the Pillow path; a JPEG the device still refuses (arithmetic coding, say) falls back to
    Pillow in decode_batch. An Adobe marker saying the 3 channels are RGB, not YCbCr
    (transform 0), stays with Pillow too: libjpeg honours it, a GPU decoder may not."""
    return bool(img.format == "JPEG" and img.mode == "RGB" and getattr(img, "filename", None)
                and not img.info.get("progressive") and not img.info.get("progression")
                and img.info.get("adobe_transform", 1) != 0 and img.fp is not None)


Encoded = collections.namedtuple("Encoded", "data box flip pixels ops path shape")
Encoded.__doc__ = """--decode device: one training image from a worker. `data` (the file's bytes,
for the device) or `pixels` (uint8 HWC, done with Pillow); the crop box (top, left, h, w) and
the flip drawn for it; its ops (encode_ops) or None; its path and (height, width)."""


class EncodedBatch:
    """--decode device: a batch of Encoded records, in one piece for the trip from a worker
    (a tensor per file would be a shared-memory handle per file). coded / decoded: the batch
    positions of the files to decode and of the images done with Pillow."""

    def __init__(self, records):
        self.n = len(records)
        coded = [i for i, r in enumerate(records) if r.data is not None]
        done = [i for i, r in enumerate(records) if r.data is None]
        self.coded, self.decoded = torch.tensor(coded, dtype=torch.int64), torch.tensor(
            done, dtype=torch.int64)
        sizes = [len(records[i].data) for i in coded]
        self.data = torch.from_numpy(np.concatenate([records[i].data for i in coded])
                                     if coded else np.zeros(0, np.uint8))
        self.offsets = np.cumsum([0] + sizes).tolist()
        self.boxes = torch.tensor([records[i].box for i in coded],
                                  dtype=torch.int64).reshape(-1, 4)
        self.flips = torch.tensor([records[i].flip for i in coded], dtype=torch.bool)
        self.shapes = [records[i].shape for i in coded]
        self.paths = [records[i].path for i in coded]
        self.pixels = (torch.from_numpy(np.stack([records[i].pixels for i in done])).permute(
            0, 3, 1, 2) if done else torch.zeros(0, 3, 1, 1, dtype=torch.uint8))

    def chunk(self, j):
        return self.data[self.offsets[j]:self.offsets[j + 1]]

    def chunks(self):
        return [self.chunk(j) for j in range(len(self.paths))]

    def pin_memory(self, device=None):  # DataLoader(pin_memory=True) calls it
        self.pixels = self.pixels.pin_memory()
        return self


@functools.lru_cache(maxsize=1)
def jpeg_decoder():
    """(name, decode(data, device)): TorchCodec's decode_jpeg where it is installed (torchvision
    0.29 deprecates its own decoders for it), else torchvision's; both take a 1-D uint8 CPU
    tensor or a list of them, give uint8 RGB CHW, decode a list on CUDA in one nvJPEG call and
    give libjpeg-turbo's pixels on a CPU (the same as Pillow's)."""
    try:
        import torchcodec
        from torchcodec.decoders import decode_jpeg
        return (f"torchcodec {torchcodec.__version__}",
                lambda data, device: decode_jpeg(data, mode="RGB", device=device))
    except (ImportError, OSError, RuntimeError):  # not installed, or its libraries missing
        pass
    import torchvision
    from torchvision.io import ImageReadMode, decode_jpeg

    def decode(data, device):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
    return f"torchvision {torchvision.__version__}", decode


def decode_jpegs(chunks, device):
    """[(uint8 CHW on `device`, None) or (None, reason)] for a list of JPEG byte tensors: one
    batched call (nvJPEG on CUDA), image by image if it fails (one bad file fails the whole
    batched call)."""
    if not chunks:
        return []
    _, decode = jpeg_decoder()
    if device.type == "cuda":
        # nvJPEG's hardware decoder writes its outputs without waiting for work already queued
        # on the stream (pytorch/vision#9606, meta-pytorch/torchcodec#1634): a block the
        # caching allocator just freed there could still be read. Drain the stream first.
        torch.cuda.current_stream(device).synchronize()
    try:
        return [(img, None) for img in decode(chunks, device)]
    except RuntimeError:
        out = []
        for c in chunks:
            try:
                out.append((decode(c, device), None))
            except RuntimeError as e:  # "decode_jpeg, <source>:<line>, <reason>"
                out.append((None, str(e).splitlines()[0].rsplit(", ", 1)[-1] or "error"))
        return out


def resized_crop(img, box, size, interpolation):
    """uint8 CHW -> float CHW: the crop box (top, left, h, w) resized to size x size, with
    antialiasing (tv's Resize(antialias=True): Pillow's filters and supports), rounded and
    clamped to 0-255. Pillow rounds to uint8 between its horizontal and vertical passes, this
    does not: a pixel differs by about 0.2 grey levels on average (bench.py decode)."""
    top, left, h, w = box
    x = img[None, :, top:top + h, left:left + w].float()
    if (h, w) != (size, size):
        x = F.interpolate(x, (size, size), mode=interpolation, antialias=True,
                          align_corners=False)
    return x[0].round_().clamp_(0, 255)


class EvalTransform:
    """timm's transforms_imagenet_eval: resize the short side, center crop, uint8 out."""

    def __init__(self, size, resize, interpolation="bicubic"):
        self.size, self.resize, self.interpolation = size, resize, interpolation

    def __call__(self, img):
        img = resize_short(rgb(img), self.resize, self.interpolation)
        return to_uint8(center_crop(img, self.size))


def normalize(images, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """uint8 NCHW -> float32, (x - 255 mean) / (255 std), as timm's PrefetchLoader, on the
    batch's device: the CPU workers never touch floats."""
    m, s = _mean_std(images.device, tuple(mean), tuple(std))
    return images.float().sub_(m).div_(s)


@functools.lru_cache(maxsize=8)
def _mean_std(device, mean, std):
    # made once per device: a fresh copy from the host every batch would block on the stream
    return (torch.tensor([255 * v for v in mean], device=device).view(1, 3, 1, 1),
            torch.tensor([255 * v for v in std], device=device).view(1, 3, 1, 1))


# ==================================================================================================
# Augment: RandAugment (timm's), TrivialAugment (tv's), random erasing, Mixup + CutMix
# ==================================================================================================

# RandAugment (Cubuk et al. 2020) as timm's rand_augment_transform: ops, magnitudes, draws

# timm _RAND_TRANSFORMS and _RAND_INCREASING_TRANSFORMS ("inc1"): same 15 ops, but the
# increasing set makes posterize, solarize and the enhancements stronger as magnitude grows
RAND_OPS = ("AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize",
            "SolarizeAdd", "Color", "Contrast", "Brightness", "Sharpness",
            "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")
RAND_INCREASING_OPS = ("AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing",
                       "SolarizeIncreasing", "SolarizeAdd", "ColorIncreasing",
                       "ContrastIncreasing", "BrightnessIncreasing", "SharpnessIncreasing",
                       "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")
ENHANCE = {"Color": ImageEnhance.Color, "Contrast": ImageEnhance.Contrast,
           "Brightness": ImageEnhance.Brightness, "Sharpness": ImageEnhance.Sharpness}


def parse_rand_augment(spec):
    """'rand-m9-n2-mstd0.5-inc1' -> dict; timm's defaults: n 2, p 0.5, mstd 0, max 10."""
    parts = spec.split("-")
    if parts[0] != "rand":
        raise UserError(f"auto_augment {spec!r} is not a RandAugment string ('rand-m9-mstd0.5')")
    cfg = dict(m=10.0, n=2, p=0.5, mstd=0.0, mmax=10.0, ops=RAND_OPS)
    for part in parts[1:]:
        key, value = (re.split(r"(\d.*)", part) + [""])[:2]
        try:
            if key == "m":
                cfg["m"] = float(int(value))
            elif key == "n":
                cfg["n"] = int(value)
            elif key == "p":
                cfg["p"] = float(value)
            elif key == "mstd":
                cfg["mstd"] = float(value) if float(value) <= 100 else math.inf
            elif key == "mmax":
                cfg["mmax"] = float(int(value))
            elif key == "inc":
                cfg["ops"] = RAND_INCREASING_OPS if int(value) else RAND_OPS
            else:
                raise ValueError
        except ValueError:
            raise UserError(f"cannot parse {part!r} in auto_augment {spec!r}") from None
    return cfg


def _signed(v):
    return -v if random.random() > 0.5 else v  # timm flips the sign of an op with p 0.5


# Every RandAugment and TrivialAugment op resolves to one of these primitives and its arguments
# (an affine op to Pillow's inverse matrix). The PIL path applies it with apply_op; --device-aug
# sends it with the image and device_augment applies it to the batch. Both draw the same way.
PRIMITIVES = ("identity", "affine", "autocontrast", "equalize", "invert", "posterize",
              "solarize", "solarize_add", "brightness", "color", "contrast", "sharpness")


def rotate_matrix(angle, size):
    """The inverse affine matrix Image.rotate(angle) samples with (about the centre, no expand),
    with Pillow's float operations: its 0/90/180 shortcuts give the same pixels as sampling."""
    w, h = size
    cx, cy = w / 2, h / 2
    t = -math.radians(angle % 360.0)
    a, b = round(math.cos(t), 15), round(math.sin(t), 15)
    d, e = round(-math.sin(t), 15), round(math.cos(t), 15)
    return (a, b, a * -cx + b * -cy + 0.0 + cx, d, e, d * -cx + e * -cy + 0.0 + cy)


def apply_op(img, op, resample, fill):
    """One primitive (name, *args) on a PIL image."""
    name, *a = op
    if name == "affine":
        return img.transform(img.size, Image.AFFINE, tuple(a), resample, fillcolor=fill)
    if name == "autocontrast":
        return ImageOps.autocontrast(img)
    if name == "equalize":
        return ImageOps.equalize(img)
    if name == "invert":
        return ImageOps.invert(img)
    if name == "posterize":
        bits = int(a[0])
        if bits <= 0:  # Pillow >= 13 refuses 0 bits; older Pillow (and so timm) gave black
            return img.point(lambda _: 0)
        return img if bits >= 8 else ImageOps.posterize(img, bits)
    if name == "solarize":
        return ImageOps.solarize(img, a[0])
    if name == "solarize_add":
        add = int(a[0])
        return img.point([min(255, i + add) if i < 128 else i for i in range(256)] * 3)
    if name in ("brightness", "color", "contrast", "sharpness"):
        return ENHANCE[name.capitalize()](img).enhance(a[0])
    if name == "identity":
        return img
    raise ValueError(f"unknown primitive {name}")


def rand_augment_primitive(name, magnitude, size):
    """A RandAugment op at `magnitude` in [0, 10] as a primitive, with timm's
    magnitude-to-argument maps; draws the sign of signed ops as timm does."""
    level = magnitude / 10.0
    if name in ("AutoContrast", "Equalize", "Invert"):
        return (name.lower(),)
    if name == "Rotate":
        return ("affine",) + rotate_matrix(_signed(level * 30.0), size)
    if name in ("Posterize", "PosterizeIncreasing"):
        return ("posterize", int(level * 4) if name == "Posterize" else 4 - int(level * 4))
    if name in ("Solarize", "SolarizeIncreasing"):
        thresh = min(256, int(level * 256))
        return ("solarize", thresh if name == "Solarize" else 256 - thresh)
    if name == "SolarizeAdd":
        return ("solarize_add", min(128, int(level * 110)))
    if name in ENHANCE:
        return (name.lower(), level * 1.8 + 0.1)
    if name.endswith("Increasing"):
        return (name[:-len("Increasing")].lower(), max(0.1, 1.0 + _signed(level * 0.9)))
    if name in ("ShearX", "ShearY"):
        s = _signed(level * 0.3)
        return ("affine",) + ((1, s, 0, 0, 1, 0) if name == "ShearX" else (1, 0, 0, s, 1, 0))
    if name in ("TranslateXRel", "TranslateYRel"):
        pct = _signed(level * 0.45)
        return ("affine",) + ((1, 0, pct * size[0], 0, 1, 0) if name == "TranslateXRel"
                              else (1, 0, 0, 0, 1, pct * size[1]))
    raise ValueError(f"unknown RandAugment op {name}")


def augment_op(img, name, magnitude, fill=(128, 128, 128), resample=Image.BICUBIC):
    """One RandAugment op at `magnitude` in [0, 10], with timm's magnitude-to-argument maps."""
    return apply_op(img, rand_augment_primitive(name, magnitude, img.size), resample, fill)


def rand_augment_draws(cfg):
    """(op name, magnitude) of each op applied: n ops drawn uniformly with replacement, each
    kept with probability p at a magnitude drawn from N(m, mstd) clamped to [0, mmax] (timm's
    RandAugment and AugmentOp). timm draws the ops with np.random.choice from numpy's global RNG
    (seeded per worker by worker_init) and the rest from `random`: the same here, so seeding
    both gives timm's image."""
    for index in np.random.choice(len(cfg["ops"]), cfg["n"]):
        name = cfg["ops"][index]
        if cfg["p"] < 1.0 and random.random() > cfg["p"]:
            continue
        m = cfg["m"]
        if cfg["mstd"] == math.inf:
            m = random.uniform(0, m)
        elif cfg["mstd"] > 0:
            m = random.gauss(m, cfg["mstd"])
        yield name, max(0.0, min(m, cfg["mmax"] or 10.0))


def rand_augment(img, cfg, fill, resample):
    """timm's RandAugment on a PIL image (see rand_augment_draws)."""
    for name, magnitude in rand_augment_draws(cfg):
        img = augment_op(img, name, magnitude, fill, resample)
    return img


# TrivialAugment Wide (Muller & Hutter 2021), the "ta_wide" of tv's recipe

def trivial_augment_space(num_bins=31):
    """tv TrivialAugmentWide._augmentation_space: op -> (magnitudes, signed), in tv's order (the
    op index is drawn over it). Magnitudes are built with torch as tv does, so each is the same
    float32 value; () marks the ops without a magnitude (no draw for them)."""
    def bins(top):
        return tuple(torch.linspace(0.0, top, num_bins).tolist())

    bits = 8 - (torch.arange(num_bins) / ((num_bins - 1) / 6)).round().int()
    return {
        "Identity": ((), False),
        "ShearX": (bins(0.99), True),
        "ShearY": (bins(0.99), True),
        "TranslateX": (bins(32.0), True),
        "TranslateY": (bins(32.0), True),
        "Rotate": (bins(135.0), True),
        "Brightness": (bins(0.99), True),
        "Color": (bins(0.99), True),
        "Contrast": (bins(0.99), True),
        "Sharpness": (bins(0.99), True),
        "Posterize": (tuple(float(b) for b in bits.tolist()), False),
        "Solarize": (tuple(torch.linspace(255.0, 0.0, num_bins).tolist()), False),
        "AutoContrast": ((), False),
        "Equalize": ((), False),
    }


TRIVIAL_AUGMENT_WIDE = trivial_augment_space(31)


def _tv_fill(fill, img):
    """tv _functional_pil._parse_fill: None is black; a number or a 1-list fills every band."""
    bands = len(img.getbands())
    if fill is None:
        fill = 0
    if isinstance(fill, (int, float)):
        return int(fill) if bands == 1 else (int(fill),) * bands
    fill = tuple(fill) * bands if len(fill) == 1 else tuple(fill)
    return tuple(int(v) for v in fill)


def _tv_affine_matrix(center, angle, translate, shear):
    """tv functional._get_inverse_affine_matrix at scale 1, the same float operations in the same
    order: the output pixels depend on the last bit of the matrix."""
    rot, sx, sy = math.radians(angle), math.radians(shear[0]), math.radians(shear[1])
    cx, cy = center
    tx, ty = translate
    a = math.cos(rot - sy) / math.cos(sy)
    b = -math.cos(rot - sy) * math.tan(sx) / math.cos(sy) - math.sin(rot)
    c = math.sin(rot - sy) / math.cos(sy)
    d = -math.sin(rot - sy) * math.tan(sx) / math.cos(sy) + math.cos(rot)
    matrix = [d, -b, 0.0, -c, a, 0.0]
    matrix[2] += matrix[0] * (-cx - tx) + matrix[1] * (-cy - ty)
    matrix[5] += matrix[3] * (-cx - tx) + matrix[4] * (-cy - ty)
    matrix[2] += cx
    matrix[5] += cy
    return matrix


def trivial_augment_primitive(name, magnitude, size):
    """One TrivialAugmentWide op with its signed magnitude as a primitive, as tv's _apply_op
    computes it for a PIL image."""
    w, h = size
    # tv: shears are given to affine as angles (atan of the magnitude) about the top-left
    # corner, translations as whole pixels (int truncates) about the image centre
    shear = math.degrees(math.atan(magnitude)) if name.startswith("Shear") else 0.0
    if name == "ShearX":
        return ("affine", *_tv_affine_matrix([0, 0], 0.0, [0, 0], [shear, 0.0]))
    if name == "ShearY":
        return ("affine", *_tv_affine_matrix([0, 0], 0.0, [0, 0], [0.0, shear]))
    if name in ("TranslateX", "TranslateY"):
        move = [int(magnitude), 0] if name == "TranslateX" else [0, int(magnitude)]
        return ("affine", *_tv_affine_matrix([w * 0.5, h * 0.5], 0.0, move, [0.0, 0.0]))
    if name == "Rotate":
        return ("affine",) + rotate_matrix(magnitude, size)
    if name in ENHANCE:
        return (name.lower(), 1.0 + magnitude)
    if name == "Posterize":
        return ("posterize", int(magnitude))
    if name == "Solarize":
        return ("solarize", magnitude)
    if name in ("AutoContrast", "Equalize", "Identity"):
        return (name.lower(),)
    raise ValueError(f"unknown TrivialAugment op {name}")


def trivial_augment_op(img, name, magnitude, resample=Image.BILINEAR, fill=None):
    """One TrivialAugmentWide op with its signed magnitude, as tv's _apply_op on a PIL image."""
    op = trivial_augment_primitive(name, magnitude, img.size)
    return apply_op(img, op, resample, _tv_fill(fill, img))


def trivial_augment_draw():
    """(op name, signed magnitude) as tv's TrivialAugmentWide draws them: one op uniformly, one
    of its 31 magnitude bins, then a sign, all from torch's RNG in tv's order, so a torch seed
    gives tv's image."""
    names = list(TRIVIAL_AUGMENT_WIDE)
    name = names[int(torch.randint(len(names), (1,)).item())]
    magnitudes, signed = TRIVIAL_AUGMENT_WIDE[name]
    magnitude = 0.0
    if magnitudes:
        magnitude = magnitudes[int(torch.randint(len(magnitudes), (1,)).item())]
    if signed and torch.randint(2, (1,)):
        magnitude = -magnitude
    return name, magnitude


def trivial_augment(img, resample=Image.BILINEAR, fill=None):
    """TrivialAugment Wide (Muller & Hutter 2021) as tv's TrivialAugmentWide. tv's recipe passes
    no fill: black."""
    return trivial_augment_op(img, *trivial_augment_draw(), resample, fill)


# Random erasing (Zhong et al. 2017): timm's on the device, tv's constant-value variant (reprob,
# recount, remode; augment_batch in the engine picks one and its order with Mixup/CutMix)

def random_erasing(x, prob, count=1, min_area=0.02, max_area=1 / 3, min_aspect=0.3,
                   mode="pixel"):
    """timm RandomErasing as its PrefetchLoader applies it (--reprob, --recount, --remode): in
    place on the normalised float NCHW batch, on the batch's device. Geometry from python's
    `random` and the noise from torch on the batch's device, call for call as timm, so the same
    seeds give the same pixels. count > 1 is timm's max_count: each erased image gets
    randint(1, count) boxes, each of 1/boxes of the sampled area."""
    if prob <= 0:  # timm builds no RandomErasing then, so draws nothing
        return x
    if mode not in ("pixel", "rand", "const"):
        raise ValueError(f"random erasing mode {mode!r} is not 'pixel', 'rand' or 'const'")
    n, channels, height, width = x.shape
    area = height * width
    log_aspect = (math.log(min_aspect), math.log(1 / min_aspect))
    for i in range(n):
        if random.random() > prob:
            continue
        boxes = random.randint(1, count) if count > 1 else 1  # timm: min_count 1, no draw at 1
        for _ in range(boxes):
            for _ in range(10):
                target_area = random.uniform(min_area, max_area) * area / boxes
                aspect = math.exp(random.uniform(*log_aspect))
                h = int(round(math.sqrt(target_area * aspect)))
                w = int(round(math.sqrt(target_area / aspect)))
                if w < width and h < height:
                    top = random.randint(0, height - h)
                    left = random.randint(0, width - w)
                    if mode == "const":
                        x[i, :, top:top + h, left:left + w] = 0
                    else:
                        shape = (channels, h, w) if mode == "pixel" else (channels, 1, 1)
                        x[i, :, top:top + h, left:left + w] = torch.empty(
                            shape, dtype=x.dtype, device=x.device).normal_()
                    break
    return x


def tv_random_erasing(x, prob, value=0.0, scale=(0.02, 0.33), ratio=(0.3, 3.3)):
    """tv's RandomErasing (references/classification: p = --random-erase, value 0, after
    Normalize), on the whole normalised batch on its device, in place. Per image the same torch
    CPU draws as tv's forward + get_params, so a batch erased here with torch seeded equals tv's
    transform applied image by image after the same seed. One box at most; an image where no
    sampled box fits in 10 tries is left alone, as tv does."""
    if prob <= 0:  # tv's preset adds no RandomErasing then
        return x
    height, width = x.shape[-2:]
    area = height * width
    log_ratio = torch.log(torch.tensor(ratio))  # float32, as tv: the bounds are rounded alike
    if isinstance(value, (int, float)):
        fill = float(value)
    else:
        fill = torch.tensor(value, dtype=x.dtype, device=x.device)[:, None, None]
    for i in range(x.shape[0]):
        if not torch.rand(1) < prob:
            continue
        for _ in range(10):
            erase_area = area * torch.empty(1).uniform_(scale[0], scale[1]).item()
            aspect = torch.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1])).item()
            h = int(round(math.sqrt(erase_area * aspect)))
            w = int(round(math.sqrt(erase_area / aspect)))
            if h < height and w < width:
                top = int(torch.randint(0, height - h + 1, size=(1,)).item())
                left = int(torch.randint(0, width - w + 1, size=(1,)).item())
                x[i, :, top:top + h, left:left + w] = fill
                break
    return x


# Mixup (Zhang et al. 2018) and CutMix (Yun et al. 2019): timm's Mixup in 'batch' mode, tv's
# RandomMixup / RandomCutmix (mixup, cutmix, mixup_style; called from augment_batch)

def smooth_one_hot(target, num_classes, smoothing=0.0):
    """Off value s / C, on value 1 - s + s / C (timm's one_hot in mixup_target)."""
    off = smoothing / num_classes
    y = torch.full((target.shape[0], num_classes), off, device=target.device)
    return y.scatter_(1, target.long().view(-1, 1), 1.0 - smoothing + off)


def mix_params(rng, mixup, cutmix, switch_prob=0.5):
    """(lam, use_cutmix) for one batch: one of the two with probability switch_prob when both
    are on, lam ~ Beta(alpha, alpha) (timm Mixup._params_per_batch, mode 'batch', prob 1)."""
    if mixup > 0 and cutmix > 0:
        use_cutmix = bool(rng.random() < switch_prob)
    else:
        use_cutmix = cutmix > 0
    alpha = cutmix if use_cutmix else mixup
    return float(rng.beta(alpha, alpha)), use_cutmix


def cutmix_box(height, width, lam, cy, cx):
    """Box of side ratio sqrt(1 - lam) centred at (cy, cx), clipped to the image; lam is
    recomputed from the clipped area (timm rand_bbox + cutmix_bbox_and_lam, correct_lam).
    timm 1.0 spans exactly cut_h rows; the 2021 timm of the RSB runs spanned 2 * (cut_h // 2),
    one row fewer for an odd cut_h. We follow the current code, whose box matches the paper."""
    ratio = math.sqrt(1.0 - lam)
    cut_h, cut_w = int(height * ratio), int(width * ratio)
    yl, yh = max(cy - cut_h // 2, 0), min(cy + (cut_h + 1) // 2, height)
    xl, xh = max(cx - cut_w // 2, 0), min(cx + (cut_w + 1) // 2, width)
    return (yl, yh, xl, xh), 1.0 - (yh - yl) * (xh - xl) / float(height * width)


def cutmix_box_tv(height, width, lam, cy, cx):
    """tv's RandomCutmix box: half-sides int(0.5 sqrt(1 - lam) * side) around (cy, cx),
    clipped, lam recomputed from the clipped area."""
    r = 0.5 * math.sqrt(1.0 - lam)
    half_h, half_w = int(r * height), int(r * width)
    yl, yh = max(cy - half_h, 0), min(cy + half_h, height)
    xl, xh = max(cx - half_w, 0), min(cx + half_w, width)
    return (yl, yh, xl, xh), 1.0 - (yh - yl) * (xh - xl) / float(height * width)


def mix_batch(x, target, num_classes, lam, box=None, smoothing=0.0, partner="flip"):
    """Mix each sample with a partner in place, soft targets to match. timm's partner of
    sample i is N-1-i (the batch flipped: an odd batch mixes its middle sample with itself);
    tv's is i-1 (the batch rolled by one)."""
    def other(t):
        return t.flip(0) if partner == "flip" else t.roll(1, 0)
    if box is not None:
        yl, yh, xl, xh = box
        x[:, :, yl:yh, xl:xh] = other(x)[:, :, yl:yh, xl:xh]
    elif lam != 1.0:
        mixed = other(x).mul_(1.0 - lam)
        x.mul_(lam).add_(mixed)
    y = smooth_one_hot(target, num_classes, smoothing)
    return x, y * lam + other(y) * (1.0 - lam)


def mixup_cutmix(x, target, num_classes, mixup, cutmix, smoothing, rng, style="timm"):
    """One of Mixup / CutMix for the batch (timm Mixup mode 'batch'; tv RandomChoice of its
    RandomMixup / RandomCutmix, the same draw); label smoothing is applied before mixing,
    which equals tv's smoothing inside the loss (both are linear)."""
    lam, use_cutmix = mix_params(rng, mixup, cutmix)
    box = None
    if use_cutmix:
        h, w = x.shape[-2:]
        cy, cx = int(rng.integers(0, h)), int(rng.integers(0, w))
        box, lam = (cutmix_box if style == "timm" else cutmix_box_tv)(h, w, lam, cy, cx)
    return mix_batch(x, target, num_classes, lam, box, smoothing,
                     "flip" if style == "timm" else "roll")


# ==================================================================================================
# Augment on the device (--device-aug): tensor ports of the Pillow ops above, for the GPU
# ==================================================================================================

# --device-aug: the same ops on the batch, on its device. The workers draw the primitives (as
# above, same RNG calls) and send them with the uint8 image; device_augment applies them to the
# whole batch as Pillow computes them: the same sampling positions, taps, float precision,
# rounding and clipping, so the images equal the PIL path's (tests/test_device_aug.py).

def encode_ops(ops, slots):
    """[(name, *args)] -> float64 [slots, 7]: primitive index, then up to 6 arguments; unused
    slots (ops skipped with probability 1 - p) are identity."""
    out = np.zeros((slots, 7), dtype=np.float64)
    for row, (name, *args) in zip(out, ops):
        row[0] = PRIMITIVES.index(name)
        row[1:1 + len(args)] = args
    return out


def device_augment(images, ops, resample=Image.BICUBIC, fill=(0, 0, 0)):
    """uint8 NCHW `images` on any device; `ops` float64 [N, slots, 7] on the host (encode_ops).
    Slot by slot, the images drawing the same primitive are processed together."""
    affine = PRIMITIVES.index("affine")
    for k in range(ops.shape[1]):
        codes, a = ops[:, k, 0].long(), ops[:, k, 1:]
        # an affine matrix that moves x (or y) by whole pixels only samples the pixel grid along
        # it (shears, translations): interpolating there gives the tap itself, so it is skipped
        grid_x = (a[:, 0] == 1) & (a[:, 1] == 0) & (a[:, 2] == a[:, 2].round())
        grid_y = (a[:, 3] == 0) & (a[:, 4] == 1) & (a[:, 5] == a[:, 5].round())
        keys = codes * 4 + (codes == affine) * (grid_x * 2 + grid_y)
        for key in torch.unique(keys).tolist():
            name, grid = PRIMITIVES[key // 4], key % 4
            if name == "identity":
                continue
            chosen = keys == key
            args = a[chosen].to(images.device, non_blocking=True)
            index = chosen.nonzero().squeeze(1).to(images.device, non_blocking=True)
            if name == "affine":  # ~18 MB of temporaries an image at 224 px: in chunks
                for i in range(0, len(index), 32):
                    part = index[i:i + 32]
                    images[part] = _affine(images[part], args[i:i + 32], resample, fill,
                                           grid_x=grid >= 2, grid_y=grid % 2 == 1)
            else:
                images[index] = DEVICE_OPS[name](images[index], args)
    return images


def _pil_luma(x):
    # Pillow's RGB -> L: (19595 R + 38470 G + 7471 B + 2^15) >> 16, exact in integers
    x = x.int()
    return (x[:, 0] * 19595 + x[:, 1] * 38470 + x[:, 2] * 7471 + 32768) >> 16


def _blend(degenerate, x, factor):
    """Image.blend(degenerate, x, factor), Pillow's float32 arithmetic, then clip and truncate."""
    alpha = factor.float().view(-1, 1, 1, 1)
    degenerate = degenerate.float()
    out = degenerate + alpha * (x.float() - degenerate)
    return out.clamp_(0, 255).trunc_().to(torch.uint8)


def _smooth(x):
    """ImageFilter.SMOOTH (3x3, 1 1 1 / 1 5 1 / 1 1 1, over 13) as Pillow's float32 filter sums
    it: the row below first, +0.5, truncated; the border pixels are kept."""
    if x.shape[-1] < 3 or x.shape[-2] < 3:
        return x
    f = x.float()
    k1, k5 = torch.tensor(1 / 13, dtype=torch.float32), torch.tensor(5 / 13, dtype=torch.float32)

    def row(r, centre):
        return (r[..., :-2] * k1 + r[..., 1:-1] * centre) + r[..., 2:] * k1

    s = row(f[:, :, 2:], k1) + 0.5
    s = s + row(f[:, :, 1:-1], k5)
    s = s + row(f[:, :, :-2], k1)
    out = x.clone()
    out[:, :, 1:-1, 1:-1] = s.clamp_(0, 255).trunc_().to(torch.uint8)
    return out


def _affine(x, a, resample, fill, grid_x=False, grid_y=False):
    """Image.transform(AFFINE, a, resample, fillcolor=fill) on each image: output pixel centre
    (x + .5, y + .5) maps through a to (u, v); outside [0, w) x [0, h) it is fill, inside
    Pillow's bilinear or bicubic (a = -1, edges clamped) taps at (u - .5, v - .5), in float64
    as Pillow computes them, then clipped and truncated. grid_x / grid_y: u - .5 (v - .5) is a
    whole number for every pixel, so only the tap on it is read."""
    n = {Image.BILINEAR: 2, Image.BICUBIC: 4}.get(resample)
    if n is None:  # Pillow's nearest takes another, incremental path; no recipe uses it
        raise UserError("--device-aug resamples with bilinear or bicubic only")
    m, c, h, w = x.shape
    a = a.double().view(m, 6, 1, 1)
    xs = torch.arange(w, device=x.device, dtype=torch.float64) + 0.5
    ys = (torch.arange(h, device=x.device, dtype=torch.float64) + 0.5).view(h, 1)
    u = a[:, 0] * xs + a[:, 1] * ys + a[:, 2]
    v = a[:, 3] * xs + a[:, 4] * ys + a[:, 5]
    inside = (u >= 0) & (u < w) & (v >= 0) & (v < h)
    flat = x.reshape(m, c, h * w)
    u, v = u - 0.5, v - 0.5
    col0, row0 = u.floor(), v.floor()
    du, dv = u - col0, v - row0
    if n == 4:
        col0, row0 = col0 - 1, row0 - 1
    centre = n // 2 - 1  # the tap at floor(u - .5), all of the weight where du == 0
    cols = [(col0 + i).clamp(0, w - 1).long() for i in ([centre] if grid_x else range(n))]
    rows = [(row0 + j).clamp(0, h - 1).long() * w for j in ([centre] if grid_y else range(n))]

    def tap(r, col):  # uint8 gather; the integer sums below are exact, as in Pillow's doubles
        index = (r + col).view(m, 1, h * w).expand(m, c, h * w)
        return flat.gather(2, index).view(m, c, h, w).int()

    def interpolate(p, d):
        # Pillow's BILINEAR and BICUBIC macros in doubles, in their order of operations; on the
        # integer taps of the first pass the sums are exact, so they are done in int32
        d = d.unsqueeze(1)
        if len(p) == 1:
            return p[0].double()
        if len(p) == 2:
            return p[0].double() + (p[1] - p[0]).double() * d
        p1, p2 = p[1], -p[0] + p[2]
        p3, p4 = 2 * (p[0] - p[1]) + p[2] - p[3], -p[0] + p[1] - p[2] + p[3]
        p1, p2, p3, p4 = (t.double() for t in (p1, p2, p3, p4))
        return p1 + d * (p2 + d * (p3 + d * p4))

    out = interpolate([interpolate([tap(r, col) for col in cols], du) for r in rows], dv)
    out = out.clamp_(0, 255).trunc_().to(torch.uint8)
    return torch.where(inside.unsqueeze(1), out, _fill_colour(x.device, tuple(fill)))


@functools.lru_cache(maxsize=8)
def _fill_colour(device, fill):
    # made once per device: a tensor from a host list is a synchronising copy on CUDA
    return torch.tensor(fill, dtype=torch.uint8, device=device).view(1, -1, 1, 1)


def _autocontrast(x, a):
    # ImageOps.autocontrast, cutoff 0: each band's [lo, hi] stretched to [0, 255], int() truncates
    lo = x.amin(dim=(2, 3), keepdim=True).double()
    hi = x.amax(dim=(2, 3), keepdim=True).double()
    # a tensor divided by a tensor: torch's scalar / tensor multiplies by the reciprocal, and
    # CUDA's tensor / scalar too, a last bit off Python's division that can flip the truncation
    scale = torch.full_like(lo, 255.0) / (hi - lo).clamp(min=1)
    out = (x.double() * scale + -lo * scale).trunc_().clamp_(0, 255).to(torch.uint8)
    return torch.where(hi > lo, out, x)


def _equalize(x, a):
    # ImageOps.equalize: step = (pixels - count of the top value) // 255, lut from the
    # cumulative histogram; a band with step 0 is kept
    m, c, h, w = x.shape
    flat = x.reshape(m * c, h * w).long()
    hist = torch.zeros(m * c, 256, dtype=torch.long, device=x.device)
    hist.scatter_add_(1, flat, torch.ones_like(flat))
    top = hist.gather(1, flat.amax(dim=1, keepdim=True))
    step = (h * w - top) // 255
    below = hist.cumsum(1) - hist
    lut = ((step // 2 + below) // step.clamp(min=1)).clamp_(max=255)
    lut = torch.where(step > 0, lut, torch.arange(256, device=x.device))
    return lut.gather(1, flat).to(torch.uint8).view(m, c, h, w)


def _posterize(x, a):
    bits = a[:, 0].long().clamp(0, 8).view(-1, 1, 1, 1)
    mask = (256 - (1 << (8 - bits))).clamp(min=0).to(torch.uint8)  # 0 bits: black
    return x & mask


def _solarize(x, a):
    return torch.where(x.double() >= a[:, :1].view(-1, 1, 1, 1), 255 - x, x)


def _solarize_add(x, a):
    add = a[:, 0].long().view(-1, 1, 1, 1)
    return torch.where(x < 128, (x.long() + add).clamp(max=255).to(torch.uint8), x)


def _contrast(x, a):
    # degenerate: the grey of int(mean of L + 0.5) (ImageStat), here in exact integers
    luma = _pil_luma(x)
    n = luma[0].numel()
    grey = ((2 * luma.sum(dim=(1, 2)) + n) // (2 * n)).view(-1, 1, 1, 1).expand_as(x)
    return _blend(grey, x, a[:, 0])


DEVICE_OPS = {  # the primitives besides affine: (uint8 images, their arguments) -> images
    "autocontrast": _autocontrast,
    "equalize": _equalize,
    "invert": lambda x, a: 255 - x,
    "posterize": _posterize,
    "solarize": _solarize,
    "solarize_add": _solarize_add,
    "brightness": lambda x, a: _blend(torch.zeros_like(x), x, a[:, 0]),
    "color": lambda x, a: _blend(_pil_luma(x).unsqueeze(1).expand_as(x), x, a[:, 0]),
    "contrast": _contrast,
    "sharpness": lambda x, a: _blend(_smooth(x), x, a[:, 0]),
}


# ==================================================================================================
# Sampler: repeated augmentation (Hoffer et al. 2019; DeiT's RASampler as in timm and tv)
# ==================================================================================================

def batch_keys(chunks, batch_seed, epoch):
    """The (index, seed) keys a training sampler yields, from (chunk number, indices) pairs:
    every index of chunk c carries seed_for(batch_seed, epoch, c), which the loader worker
    seeds the batch's augmentation from (ImageFolder.__getitems__)."""
    for c, indices in chunks:
        seed = seed_for(batch_seed, epoch, c)
        yield from ((i, seed) for i in indices)


class TrainSampler(torch.utils.data.Sampler):
    """One rank's share of an epoch's train order. The order is a permutation seeded by seed + epoch
    (seed: a seed_for(run seed, SEED_ORDER) base) cut into global batches of world x accum x
    batch images, the last partial one dropped (as timm; tv's train.py keeps a last partial
    batch, one step more on data sets the batch does not divide). Rank r takes the r-th block of
    accum x batch of each global batch, so an update sees the same images whatever the world
    size and accumulation: 2 processes x 1 step = 1 process x 2 accumulation steps. Chunk c (the
    c-th `batch` of the order) comes with the seed its augmentation is drawn from,
    seed_for(batch_seed, epoch, c): the batches of an epoch are the same in any world size, with
    any number of loader workers."""

    def __init__(self, length, batch, accum=1, world=1, rank=0, seed=0, batch_seed=0):
        if not 0 <= rank < world:
            raise UserError(f"rank {rank} outside a world of {world}")
        self.length, self.batch, self.accum, self.world, self.rank = length, batch, accum, \
            world, rank
        self.seed, self.batch_seed, self.epoch, self.skip = seed, batch_seed, 0, 0
        self.updates = length // (batch * accum * world)

    def epoch_order(self):
        g = torch.Generator()
        g.manual_seed(self.seed + self.epoch)
        return torch.randperm(self.length, generator=g).tolist()

    def __iter__(self):
        order, b = self.epoch_order(), self.batch
        chunks = ((k * self.world + self.rank) * self.accum + m
                  for k in range(self.updates) for m in range(self.accum))
        chunks = itertools.islice(chunks, self.skip, None)
        return batch_keys(((c, order[c * b:(c + 1) * b]) for c in chunks), self.batch_seed,
                          self.epoch)

    def __len__(self):
        return (self.updates * self.accum - self.skip) * self.batch

    def set_epoch(self, epoch, skip=0):
        """Epoch `epoch` from this rank's batch `skip` on (a run resumed mid-epoch): the
        batches before it are neither decoded nor augmented."""
        self.epoch, self.skip = epoch, skip


class RepeatedAugSampler(torch.utils.data.Sampler):
    """Each index `repeats` times in a row of an epoch-seeded permutation, the list padded to a
    multiple of `world` and dealt out rank::world, so the copies of one image land on
    different ranks (different augmentations in one step). Seeded with seed + epoch: seed 0
    gives timm's RepeatAugSampler (seeded with the epoch) and tv's RASampler (seed + epoch).

    Each rank keeps floor(len // 256 * 256 / world) samples, as timm (selected_round 256) and
    tv: an epoch is len // 256 * 256 samples, so with 3 repeats a third of the images. That is
    143 images fewer on ImageNet, but 12% fewer steps on 1,437 images, which changed a
    15-epoch tv run by 10 points; we follow them. Below 256 images, where they would yield
    nothing, each rank keeps ceil(len / world). Works in a single process (world 1).
    """

    def __init__(self, length, repeats, world=1, rank=0, seed=0, shuffle=True, batch=None,
                 batch_seed=0):
        if int(repeats) != repeats or repeats < 1:
            raise UserError(f"repeated augmentation needs a whole number >= 1, got {repeats}")
        if not 0 <= rank < world:
            raise UserError(f"rank {rank} outside a world of {world}")
        self.length, self.repeats, self.world, self.rank = length, int(repeats), world, rank
        self.seed, self.shuffle, self.epoch, self.skip = seed, shuffle, 0, 0
        self.batch, self.batch_seed = batch, batch_seed
        rounded = length // 256 * 256
        self.num_samples = rounded // world if rounded else math.ceil(length / world)
        self.total_size = math.ceil(length * self.repeats / world) * world

    def epoch_indices(self):
        """This epoch's full list before it is dealt out: the repeated permutation, padded to a
        multiple of `world` by wrapping around."""
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.length, generator=g)
        else:
            order = torch.arange(self.length)
        indices = torch.repeat_interleave(order, self.repeats).tolist()
        pad = self.total_size - len(indices)
        if pad > 0:
            indices += (indices * math.ceil(pad / len(indices)))[:pad]
        return indices

    def __iter__(self):
        indices = self.epoch_indices()[self.rank::self.world][:self.num_samples]
        if self.batch is None:  # plain indices, as timm's and tv's samplers
            return iter(indices)
        # this rank's j-th batch is chunk j x world + rank
        b = self.batch
        return batch_keys(((j * self.world + self.rank, indices[j * b:(j + 1) * b])
                           for j in range(self.skip, math.ceil(len(indices) / b))),
                          self.batch_seed, self.epoch)

    def __len__(self):
        return max(self.num_samples - self.skip * (self.batch or 0), 0)

    def set_epoch(self, epoch, skip=0):
        """As TrainSampler.set_epoch; skipping needs batches (batch=...)."""
        if skip and self.batch is None:
            raise ValueError("RepeatedAugSampler skips batches only when made with batch=")
        self.epoch, self.skip = epoch, skip


# ==================================================================================================
# Loss: cross-entropy with label smoothing, binary cross-entropy with target threshold
# ==================================================================================================

def cross_entropy(logits, target, smoothing=0.0):
    if target.ndim == 1:
        return F.cross_entropy(logits, target, label_smoothing=smoothing)
    return torch.sum(-target * F.log_softmax(logits, dim=-1), dim=-1).mean()  # soft targets


def binary_cross_entropy(logits, target, smoothing=0.0, target_thresh=None):
    """timm BinaryCrossEntropy: RSB trains with BCE on the (mixed) targets, binarised > thresh."""
    if target.ndim == 1:
        target = smooth_one_hot(target, logits.shape[-1], smoothing)
    if target_thresh is not None:
        target = target.gt(target_thresh).to(target.dtype)
    return F.binary_cross_entropy_with_logits(logits, target)


# ==================================================================================================
# Optim: LAMB, RMSpropTF, AdamP, SGD (+ AGC) as timm's and tv's, multi-tensor
# ==================================================================================================

CPU_CHUNK = 2 ** 20  # elements per multi-tensor op on the CPU, see param_slices


def param_slices(params):
    """The slices of `params` to run each multi-tensor op on: all at once on a GPU (one kernel
    per op for the whole model), slices of about a million elements on the CPU, whose
    temporaries then stay in cache and in malloc's free lists (10-15% faster there on a
    ResNet-50 than whole-model ops, which fault in 100 MB of fresh pages per op)."""
    if not params:
        return []
    if params[0].device.type != "cpu":
        return [params]
    out, cur, n = [], [], 0
    for p in params:
        if cur and n + p.numel() > CPU_CHUNK:
            out.append(cur)
            cur, n = [], 0
        cur.append(p)
        n += p.numel()
    return out + [cur] if cur else out


def _adam_moments(m, v, grads, beta1, beta2, sqrt_bc2, eps):
    """Adam's moments updated in place in timm's order of operations (m = beta1 m + (1 - beta1)
    g, v = beta2 v + (1 - beta2) g^2), and the denominator sqrt(v) / sqrt_bc2 + eps, where
    sqrt_bc2 is one number or one per tensor."""
    torch._foreach_mul_(m, beta1)
    torch._foreach_add_(m, grads, alpha=1 - beta1)
    torch._foreach_mul_(v, beta2)
    torch._foreach_addcmul_(v, grads, grads, value=1 - beta2)
    denom = torch._foreach_sqrt(v)
    torch._foreach_div_(denom, sqrt_bc2)
    torch._foreach_add_(denom, eps)
    return denom


class _SlicedOptimizer(torch.optim.Optimizer):
    """The shared step of LAMB, RMSpropTF and AdamP: _begin() once (LAMB's global clip), then
    per param group the tensors with a gradient, in the slices of param_slices, go to the
    subclass's _update(params, group)."""

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._begin()
        for group in self.param_groups:
            for params in param_slices([p for p in group["params"] if p.grad is not None]):
                self._update(params, group)
        return loss

    def _begin(self):
        pass

    def _update(self, params, group):
        raise NotImplementedError


class Lamb(_SlicedOptimizer):
    """timm.optim.Lamb: Adam moments with bias correction, the whole gradient first clipped to
    global norm `max_grad_norm`, then a per-tensor trust ratio ||w|| / ||update|| for tensors
    with weight decay (1 where either norm is 0)."""

    def __init__(self, params, lr, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01,
                 max_grad_norm=1.0):
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps,
                                      weight_decay=weight_decay, max_grad_norm=max_grad_norm))

    def _begin(self):
        """The global-norm clip factor over every group's gradients; a step for each group."""
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        self._clip = None
        if grads and self.defaults["max_grad_norm"] is not None:
            norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
            self._clip = (norm / self.defaults["max_grad_norm"]).clamp_(min=1.0)
        for group in self.param_groups:
            if any(p.grad is not None for p in group["params"]):
                group["step"] = group.get("step", 0) + 1

    def _update(self, params, group):
        clip = self._clip
        beta1, beta2 = group["betas"]
        bc1, bc2 = 1 - beta1 ** group["step"], 1 - beta2 ** group["step"]
        g = [p.grad for p in params]
        if clip is not None:
            torch._foreach_div_(g, clip)
        for p in params:
            if not self.state[p]:
                self.state[p]["exp_avg"] = torch.zeros_like(p)
                self.state[p]["exp_avg_sq"] = torch.zeros_like(p)
        m = [self.state[p]["exp_avg"] for p in params]
        denom = _adam_moments(m, [self.state[p]["exp_avg_sq"] for p in params], g, beta1,
                              beta2, math.sqrt(bc2), group["eps"])
        update = torch._foreach_div(m, bc1)
        torch._foreach_div_(update, denom)
        if group["weight_decay"] != 0:
            torch._foreach_add_(update, params, alpha=group["weight_decay"])
            w_norm = torch.stack(torch._foreach_norm(params))
            u_norm = torch.stack(torch._foreach_norm(update))
            ratio = torch.where((w_norm > 0) & (u_norm > 0), w_norm / u_norm,
                                torch.ones_like(w_norm))
            torch._foreach_mul_(update, list(ratio.unbind()))
        torch._foreach_add_(params, update, alpha=-group["lr"])


# Unit-wise sums for AGC and AdamP: one flat concatenation and one segmented reduction for
# a whole list of tensors, no per-parameter loop

def _units(shape):
    """AGC / AdamP channel view: one unit per output channel (dim 0) of a conv / linear weight,
    the whole tensor for biases, norm weights and scalars."""
    return shape[0] if len(shape) > 1 else 1


def _segments(tensors):
    """(row lengths, units per tensor) for the flat concatenation of `tensors`, on their device."""
    return _segments_for(tensors[0].device, tuple(tuple(t.shape) for t in tensors))


@functools.lru_cache(maxsize=256)
def _segments_for(device, shapes):
    # memoised by shapes: building the index tensors every step would cost a host-to-device
    # copy, which waits for the GPU
    units = [_units(s) for s in shapes]
    lengths = [math.prod(s) // u for s, u in zip(shapes, units) for _ in range(u)]
    return torch.tensor(lengths, device=device), torch.tensor(units, device=device)


def _unit_sums(tensors, lengths):
    # unsafe: the lengths sum to the concatenation's size by construction, and the check would
    # sync with the device
    flat = torch.cat([t.reshape(-1) for t in tensors])
    return torch.segment_reduce(flat, "sum", lengths=lengths, unsafe=True)


def _unit_dots(xs, ys):
    """sum(x * y) per unit of every tensor pair, concatenated in unit order. On a GPU: one flat
    product and one segmented reduction, two kernels instead of a few per tensor. On the CPU,
    where there is no launch to save: per tensor, which stays in cache and makes no flat copy
    (2-3x faster there for a ResNet-50)."""
    if xs[0].device.type == "cpu":
        return torch.cat([(x.reshape(_units(x.shape), -1) * y.reshape(_units(y.shape), -1))
                          .sum(1) for x, y in zip(xs, ys)])
    lengths, _ = _segments(xs)
    return _unit_sums(torch._foreach_mul(xs, ys), lengths)


def _per_tensor(values, tensors):
    """Views of a per-unit vector shaped to broadcast against each tensor: (C, 1, ..., 1) for a
    weight, () for a whole-tensor unit."""
    out = []
    for v, t in zip(values.split([_units(t.shape) for t in tensors]), tensors):
        out.append(v.view((-1,) + (1,) * (t.ndim - 1)) if t.ndim > 1 else v.view(()))
    return out


class RMSpropTF(_SlicedOptimizer):
    """timm.optim.RMSpropTF as timm's factory builds it for --opt rmsproptf: TensorFlow's RMSprop
    (eps inside the sqrt, mean square initialised to ones, lr applied inside the momentum buffer),
    L2 weight decay added to the gradient, not centered."""

    def __init__(self, params, lr, alpha=0.9, eps=1e-10, weight_decay=0.0, momentum=0.0):
        if lr < 0 or eps < 0 or momentum < 0 or weight_decay < 0 or alpha < 0:
            raise ValueError(f"RMSpropTF: invalid lr={lr} alpha={alpha} eps={eps} "
                             f"weight_decay={weight_decay} momentum={momentum}")
        super().__init__(params, dict(lr=lr, alpha=alpha, eps=eps, weight_decay=weight_decay,
                                      momentum=momentum))

    def _update(self, params, group):
        momentum = group["momentum"]
        for p in params:
            state = self.state[p]
            if not state:
                # timm (TF): ones, where torch's RMSprop starts from zeros, so the first
                # steps are small instead of ~lr * sign(grad) / sqrt(1 - alpha)
                state["square_avg"] = torch.ones_like(p)
            if momentum > 0 and "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p)
        grads = [p.grad for p in params]
        if group["weight_decay"] != 0:
            # timm default decoupled_decay=False: L2 on the gradient, so it is divided by the
            # RMS like the loss gradient; .grad itself is left alone
            grads = torch._foreach_add(grads, params, alpha=group["weight_decay"])
        sq = [self.state[p]["square_avg"] for p in params]
        # timm keeps TF's order of ops: avg += (g^2 - avg) * (1 - alpha)
        diff = torch._foreach_mul(grads, grads)
        torch._foreach_sub_(diff, sq)
        torch._foreach_add_(sq, diff, alpha=1.0 - group["alpha"])
        del diff
        # timm RMSpropTF: eps inside the sqrt (TF), so eps=1e-3 acts like ~0.03 outside it
        rms = torch._foreach_add(sq, group["eps"])
        torch._foreach_sqrt_(rms)
        if momentum > 0:
            # timm lr_in_momentum=True (TF): the buffer accumulates lr-scaled steps, so an
            # lr change reaches the update gradually instead of rescaling the whole buffer
            buf = [self.state[p]["momentum_buffer"] for p in params]
            torch._foreach_mul_(buf, momentum)
            torch._foreach_addcdiv_(buf, grads, rms, value=group["lr"])
            torch._foreach_sub_(params, buf)
        else:
            torch._foreach_addcdiv_(params, grads, rms, value=-group["lr"])


class AdamP(_SlicedOptimizer):
    """timm.optim.AdamP (Heo et al. 2021) with the settings of timm's factory for --opt adamp
    (wd_ratio 0.01, nesterov). Adam with bias correction and decoupled weight decay; for weights
    with ndim > 1 whose gradient is nearly orthogonal to the weight (scale-invariant weights, e.g.
    a conv followed by BN), first per output channel, else over the whole tensor, the radial part
    of the update is removed and the weight decay multiplied by wd_ratio."""

    def __init__(self, params, lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, delta=0.1,
                 wd_ratio=0.01, nesterov=True):
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps,
                                      weight_decay=weight_decay, delta=delta, wd_ratio=wd_ratio,
                                      nesterov=nesterov))

    def _update(self, params, group):
        beta1, beta2 = group["betas"]
        # timm counts steps per parameter (a tensor without a gradient keeps its count), so
        # the bias corrections are per-tensor scalars
        sqrt_bc2, neg_step = [], []
        for p in params:
            state = self.state[p]
            if not state:
                state["step"] = 0
                state["exp_avg"] = torch.zeros_like(p)
                state["exp_avg_sq"] = torch.zeros_like(p)
            state["step"] += 1
            sqrt_bc2.append(math.sqrt(1 - beta2 ** state["step"]))
            neg_step.append(-group["lr"] / (1 - beta1 ** state["step"]))
        grads = [p.grad for p in params]
        m = [self.state[p]["exp_avg"] for p in params]
        denom = _adam_moments(m, [self.state[p]["exp_avg_sq"] for p in params], grads, beta1,
                              beta2, sqrt_bc2, group["eps"])
        if group["nesterov"]:
            # timm/clovaai: beta1 * m_t + (1 - beta1) * g_t, divided by the same lr / (1 -
            # beta1^t) as plain Adam (NAdam would use 1 - beta1^(t+1) for the m_t term)
            perturb = torch._foreach_mul(m, beta1)
            torch._foreach_add_(perturb, grads, alpha=1 - beta1)
            torch._foreach_div_(perturb, denom)
        else:
            perturb = torch._foreach_div(m, denom)
        del denom
        nd = [i for i, p in enumerate(params) if p.ndim > 1]
        flat = [i for i, p in enumerate(params) if p.ndim <= 1]
        if nd:
            ratio = self._project([params[i] for i in nd], [grads[i] for i in nd],
                                  [perturb[i] for i in nd], group)
        if group["weight_decay"] > 0:
            # decoupled and applied before the step, to the weight the projection looked at
            lr_wd = group["lr"] * group["weight_decay"]
            if flat:
                torch._foreach_mul_([params[i] for i in flat], 1.0 - lr_wd)
            if nd:
                torch._foreach_mul_([params[i] for i in nd],
                                    list((1.0 - lr_wd * ratio).unbind()))
        torch._foreach_mul_(perturb, neg_step)
        torch._foreach_add_(params, perturb)

    @staticmethod
    def _project(params, grads, perturb, group):
        """timm adamp.projection for every tensor at once; `perturb` is updated in place.
        Returns the per-tensor weight-decay factor: wd_ratio where projected, else 1."""
        eps, delta = group["eps"], group["delta"]
        lengths, units = _segments(params)
        dot_gp = _unit_dots(grads, params)
        sq_g = _unit_dots(grads, grads)
        sq_p = _unit_dots(params, params)
        dot_pu = _unit_dots(params, perturb)
        n = len(params)

        def per_tensor(x):  # timm's layer view: whole-tensor sums from the channel sums
            return torch.segment_reduce(x, "sum", lengths=units, unsafe=True)

        dtype, device = sq_p.dtype, sq_p.device
        numel = per_tensor(lengths.to(dtype))
        fan_in = numel / units.to(dtype)
        # F.cosine_similarity: x.y / (max(|x|, eps) * max(|y|, eps)); timm takes |cos|
        cos_c = dot_gp.abs() / (sq_g.sqrt().clamp(min=eps) * sq_p.sqrt().clamp(min=eps))
        # timm: the channel view applies only if *every* channel is below delta / sqrt(fan-in)
        cos_c_max = torch.segment_reduce(cos_c, "max", lengths=units, unsafe=True)
        by_channel = cos_c_max < delta / fan_in.sqrt()
        sq_p_l = per_tensor(sq_p)
        cos_l = per_tensor(dot_gp).abs() / (per_tensor(sq_g).sqrt().clamp(min=eps)
                                            * sq_p_l.sqrt().clamp(min=eps))
        by_layer = ~by_channel & (cos_l < delta / numel.sqrt())
        # timm: perturb -= p_n * <p_n, perturb>, p_n = p / (|p| + eps) in the chosen view; the
        # radial part of the step only grows |w| (which shrinks the effective lr of a
        # scale-invariant weight), the reason AdamP exists
        coef_c = dot_pu / (sq_p.sqrt() + eps).square()
        coef_l = per_tensor(dot_pu) / (sq_p_l.sqrt() + eps).square()
        total = lengths.numel()
        coef = torch.where(by_channel.repeat_interleave(units, output_size=total), coef_c,
                           torch.where(by_layer, coef_l, 0.0).repeat_interleave(
                               units, output_size=total))
        torch._foreach_sub_(perturb, torch._foreach_mul(params, _per_tensor(coef, params)))
        one = torch.ones(n, dtype=dtype, device=device)
        return torch.where(by_channel | by_layer, group["wd_ratio"] * one, one)


# ==================================================================================================
# Adaptive gradient clipping (Brock et al. 2021), as timm's --clip-mode agc
# ==================================================================================================

@torch.no_grad()
def agc(parameters, clip_factor, eps=1e-3):
    """timm.utils.adaptive_clip_grad, in place on .grad: each unit's gradient (an output channel
    of a weight with ndim > 1, the whole tensor otherwise) is scaled to at most
    clip_factor * max(|unit weight|, eps) when its norm reaches that."""
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    params = [p for p in parameters if p.grad is not None and p.numel() > 0]
    if not params:
        return
    grads = [p.grad for p in params]
    w_norm = _unit_dots(params, params).sqrt_()
    g_norm = _unit_dots(grads, grads).sqrt_()
    max_norm = w_norm.clamp_(min=eps).mul_(clip_factor)
    # timm: clipped where the norm is not below the max (so == clips too, by a factor of 1), and
    # 1e-6 guards the division
    scale = torch.where(g_norm < max_norm, 1.0, max_norm / g_norm.clamp(min=1e-6))
    torch._foreach_mul_(grads, _per_tensor(scale, params))


def head_excluded(model):
    """The parameters timm's train.py clips with --clip-mode agc: model_parameters(model,
    exclude_head=True) drops the last two registered parameters (the classifier's weight and
    bias; the fc is registered last in this repo's ResNet), whatever their names."""
    return list(model.parameters())[:-2]


# ==================================================================================================
# Weight-decay groups, timm's and tv's side by side, and the optimizer factory (opt, lr,
# weight_decay, wd_groups, momentum, nesterov, opt_eps, opt_betas)
# ==================================================================================================

# tv references/classification/utils.py set_weight_decay: its default norm_classes
_TV_NORMS = (torch.nn.modules.batchnorm._BatchNorm, torch.nn.LayerNorm, torch.nn.GroupNorm,
             torch.nn.modules.instancenorm._InstanceNorm, torch.nn.LocalResponseNorm)


def param_groups(model, weight_decay):
    """timm: no weight decay on biases and norm weights (ndim <= 1)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
    return [dict(params=no_decay, weight_decay=0.0), dict(params=decay, weight_decay=weight_decay)]


def tv_param_groups(model, weight_decay, norm_weight_decay=0.0):
    """tv set_weight_decay (no custom keys): every parameter of a normalisation layer (weight
    and bias) gets norm_weight_decay, everything else, conv and fc biases included, weight_decay.
    norm_weight_decay None: one group, as tv without --norm-weight-decay."""
    other, norm = [], []
    for module in model.modules():
        for p in module.parameters(recurse=False):
            if p.requires_grad:
                is_norm = norm_weight_decay is not None and isinstance(module, _TV_NORMS)
                (norm if is_norm else other).append(p)
    groups = [dict(params=other, weight_decay=weight_decay),
              dict(params=norm, weight_decay=norm_weight_decay)]
    return [g for g in groups if g["params"]]


OPTIMIZERS = ("lamb", "rmsproptf", "sgd", "adamp")


def create_optimizer(model, recipe):
    """The recipe's optimizer over its weight-decay groups: wd_groups "timm" (no decay on
    ndim <= 1 and .bias, timm's filter_bias_and_bn), "tv" (no decay on norm layers only) or
    "all" (decay on every parameter).
    opt_eps / opt_betas None: the optimizer's own default, as timm's --opt-eps / --opt-betas."""
    opt, lr, wd = recipe["opt"], recipe["lr"], recipe["weight_decay"]
    if opt not in OPTIMIZERS:
        raise UserError(f"unknown optimizer {opt!r} (have: {', '.join(OPTIMIZERS)})")
    if recipe["wd_groups"] == "timm":
        groups = param_groups(model, wd)
    elif recipe["wd_groups"] == "tv":
        groups = tv_param_groups(model, wd)
    elif recipe["wd_groups"] == "all":  # tv's old ResNet-50 baseline (the blog's row 0)
        groups = tv_param_groups(model, wd, norm_weight_decay=None)
    else:
        raise UserError(f"unknown wd_groups {recipe['wd_groups']!r} (have: timm, tv, all)")
    eps = {} if recipe["opt_eps"] is None else dict(eps=recipe["opt_eps"])
    betas = {} if recipe["opt_betas"] is None else dict(betas=tuple(recipe["opt_betas"]))
    if opt in ("rmsproptf", "sgd") and recipe["momentum"] is None:
        raise UserError(f"--opt {opt} needs --momentum (timm train.py and tv default: 0.9)")
    if opt == "lamb":
        return Lamb(groups, lr=lr, **betas, **eps)
    if opt == "rmsproptf":
        # timm factory: alpha 0.9; momentum and eps from train.py's --momentum / --opt-eps
        return RMSpropTF(groups, lr=lr, alpha=0.9, momentum=recipe["momentum"], **eps)
    if opt == "sgd":
        # timm's "sgd" is Nesterov, tv's plain momentum: the recipe says which
        return torch.optim.SGD(groups, lr=lr, momentum=recipe["momentum"],
                               nesterov=bool(recipe["nesterov"]), foreach=True)
    # timm factory for adamp: wd_ratio 0.01 (the class default is 0.1) and nesterov
    nesterov = True if recipe["nesterov"] is None else bool(recipe["nesterov"])
    return AdamP(groups, lr=lr, wd_ratio=0.01, delta=0.1, nesterov=nesterov, **betas, **eps)


def clip_gradients(model, clip):
    """timm train.py --clip-mode agc (head excluded) or norm (all parameters), called after
    the AMP unscale so the thresholds apply to the true gradients."""
    if clip["mode"] == "agc":
        agc(head_excluded(model), clip["value"])
    else:
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip["value"])


# ==================================================================================================
# Schedule: linear warmup, then cosine (timm CosineLRScheduler, tv CosineAnnealingLR) or step
# decay (timm StepLRScheduler), with timm's lr noise
# ==================================================================================================


def _noise(t, recipe, noise_seed):
    """timm Scheduler._add_noise as train.py sets it up: the lr of epoch t is multiplied by
    1 + n for t in [start, end), fractions of `epochs`, n ~ N(0, std) drawn from a generator
    seeded noise_seed + t and redrawn until |n| < pct. Returns n, or 0 outside the range."""
    spec = recipe.get("lr_noise")
    if spec is None:
        return 0.0
    # timm create_scheduler_v2: a single number (or a 1-list) switches the noise on for good
    spec = [spec] if isinstance(spec, (int, float)) else list(spec)
    start = spec[0] * recipe["epochs"]
    end = spec[1] * recipe["epochs"] if len(spec) > 1 else math.inf
    # Per-update stepping: timm redraws per update, seeded with the update index; we keep one
    # draw per epoch (the seed needs an integer, and the update count is not known here).
    # Epoch 0: timm's train.py never calls step(0), so the first epoch runs at the lr the
    # scheduler's constructor set, without noise.
    epoch = math.floor(t)
    if epoch == 0 or not start <= epoch < end:
        return 0.0
    pct = recipe.get("lr_noise_pct", 0.67)
    std = recipe.get("lr_noise_std", 1.0)
    g = torch.Generator()
    g.manual_seed(noise_seed + epoch)
    while True:
        # timm's _calculate_noise ignores --lr-noise-std (plain randn); we honour it, which
        # changes nothing at the default 1.0 that every recipe here uses
        n = std * torch.randn(1, generator=g).item()
        if abs(n) < pct:
            return n


def lr_at(t, recipe, noise_seed=0):
    """lr at epoch t (a float when stepping per update).

    Warmup: linear from `warmup_lr` (timm, absolute) or from `warmup_factor` * lr (tv's
    LinearLR start_factor) to lr over `warmup_epochs`. After it, `sched`:
      cosine: to `min_lr` (None = 0). warmup_prefix False (timm's default) counts the cosine
        from epoch 0, warmup included, over `epochs`; True starts it after the warmup and spans
        epochs - warmup_epochs (tv's SequentialLR(LinearLR, CosineAnnealingLR(T_max=epochs -
        warmup)), ResNet-RS).
      step: lr * decay_rate ** (t // decay_epochs), t counted from 0 or, with warmup_prefix,
        from the end of the warmup (timm StepLRScheduler; train.py passes warmup_prefix False).
    Then timm's lr noise where `lr_noise` is set (see _noise); `noise_seed` is timm's --seed.
    The arithmetic follows timm's operation order, so per-epoch values equal timm's bit for bit.
    """
    lr, warmup, epochs = recipe["lr"], recipe["warmup_epochs"], recipe["epochs"]
    # s: time since the decay started, which tv and ResNet-RS start after the warmup
    prefix = bool(recipe.get("warmup_prefix", False))
    s = t - warmup if prefix else t
    if t < warmup:
        start = recipe.get("warmup_lr")
        if start is None:
            factor = recipe.get("warmup_factor")
            if factor is None:
                raise UserError("warmup_epochs > 0 needs warmup_lr or warmup_factor")
            start = lr * factor
        value = start + t * ((lr - start) / warmup)
    elif recipe["sched"] == "cosine":
        min_lr = recipe.get("min_lr") or 0.0
        length = epochs - warmup if prefix else epochs
        if s >= length:
            value = min_lr
        else:
            value = min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * s / length))
    elif recipe["sched"] == "step":
        if not recipe.get("decay_rate") or not recipe.get("decay_epochs"):
            raise UserError("sched 'step' needs decay_rate and decay_epochs")
        value = lr * recipe["decay_rate"] ** (s // recipe["decay_epochs"])
    else:
        raise UserError(f"schedule {recipe['sched']!r} is not implemented (have: cosine, step)")
    n = _noise(t, recipe, noise_seed)
    return value + value * n if n else value


# ==================================================================================================
# EMA of the weights: timm ModelEmaV3, tv's AveragedModel recipe, TF ExponentialMovingAverage
# (ema_decay / ema_style here; the run makes it in wrap_model and updates it in train_step)
# ==================================================================================================

def tv_ema_decay(decay, world, batch_per_gpu, every, epochs):
    """tv train.py's adjustment (from pycls): alpha = 1 - decay scaled by the number of images
    between two EMA updates over the epochs, so the decay per epoch barely depends on the
    batch, world size and update interval. Same operation order as tv."""
    adjust = world * batch_per_gpu * every / epochs
    alpha = 1.0 - decay
    alpha = min(1.0, alpha * adjust)
    return 1.0 - alpha


class EMA:
    """Exponential moving average of a model's parameters and buffers (BN statistics too), in
    its own copy `self.module` (eval mode, no gradients). Floating tensors are averaged with
    one multi-tensor lerp; integer buffers (num_batches_tracked) are copied, as timm does.

    Styles, all through `update(model, copy=False)` called after an optimizer step:
      timm (B; ModelEmaV2 / ModelEmaV3.update(model)): fixed `decay` at every update.
      tv: call every `every`-th update of an epoch with decay = tv_ema_decay(...), and
        copy=True during the warmup epochs. tv zeroes AveragedModel.n_averaged after each
        warmup update, so the update after it copies too: copy=True here means "copy now and
        at the next update", which makes the first update after the warmup a copy as in tv.
        copy_first=True: the very first update copies, as AveragedModel (n_averaged starts at
        0; without warmup this is the only copy) and as current timm train.py, whose
        ModelEmaV3.update(model, step=num_updates) uses decay 0 at step 1. The RSB runs used
        ModelEmaV2, which averages from the first update: copy_first False.
      tf_warmup (ResNet-RS, the TPU ResNet/EfficientNet code): tf.train.
        ExponentialMovingAverage(decay, num_updates=global_step), whose n-th update (n from 1:
        it reads the step after the optimizer incremented it) uses min(decay, (1+n)/(10+n)).
    """

    def __init__(self, model, decay, tf_warmup=False, copy_first=False):
        self.module = deepcopy(unwrap(model)).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.decay, self.tf_warmup = decay, tf_warmup
        self.num_updates = 0
        self.copy_next = copy_first

    def decay_at(self, n):
        """The decay of the n-th update (n from 1), copies aside."""
        if self.tf_warmup:
            return min(self.decay, (1.0 + n) / (10.0 + n))
        return self.decay

    @torch.no_grad()
    def update(self, model, copy=False):
        """One EMA update from `model` (DDP / compiled wrappers are looked through); returns
        the decay used (0.0 for a copy)."""
        self.num_updates += 1
        decay = 0.0 if copy or self.copy_next else self.decay_at(self.num_updates)
        self.copy_next = copy
        # keep_vars: the tensors themselves, no detach per tensor (~0.2 ms a ResNet-50 step)
        ours = self.module.state_dict(keep_vars=True)
        theirs = unwrap(model).state_dict(keep_vars=True)
        if len(ours) != len(theirs):
            raise UserError(f"EMA holds {len(ours)} tensors, the model {len(theirs)}")
        ema_f, model_f, ema_i, model_i = [], [], [], []
        # zip by order, as timm: the keys are the same module's, and state_dict() is ordered
        for e, m in zip(ours.values(), theirs.values()):
            if e.is_floating_point():
                ema_f.append(e)
                model_f.append(m)
            else:
                ema_i.append(e)
                model_i.append(m)
        if ema_i:  # num_batches_tracked: copied, as timm
            torch._foreach_copy_(ema_i, model_i)
        if decay == 0.0:
            torch._foreach_copy_(ema_f, model_f)
        else:
            torch._foreach_lerp_(ema_f, model_f, 1.0 - decay)
        return decay

    def state_dict(self):
        return dict(module=self.module.state_dict(), num_updates=self.num_updates,
                    copy_next=self.copy_next)

    def load_state_dict(self, state):
        """Our state_dict(), or a plain model state dict (timm's state_dict_ema)."""
        if isinstance(state.get("module"), dict):
            self.module.load_state_dict(state["module"])
            self.num_updates = int(state.get("num_updates", 0))
            self.copy_next = bool(state.get("copy_next", False))
        else:
            self.module.load_state_dict(state)


# ==================================================================================================
# Engine: distributed setup, loaders, train step, evaluation, checkpoints
# ==================================================================================================

# Processes, loaders, evaluation

def setup_device(device_arg):
    """(device, rank, world): torchrun's env:// when WORLD_SIZE is set, else one process."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank, local_rank = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    if world > 1 and device_arg and ":" in device_arg:
        raise UserError(f"--device {device_arg} under torchrun would put every rank on one GPU: "
                        "pass --device cuda (each rank takes the GPU of its LOCAL_RANK)")
    if device_arg in (None, "", "auto"):
        device_arg = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device_arg)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError("--device cuda asked for, but torch sees no CUDA GPU")
        if device.index is None:
            device = torch.device("cuda", cuda_index(local_rank, torch.cuda.device_count()))
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method="env://",
                                timeout=DIST_TIMEOUT)
    return device, rank, world


# Rank 0 lists the data folders while the others wait in a collective: on a shared file system
# 1.28M files can take minutes (README GPUs and nodes), beyond NCCL's 10-minute default. The
# price: a rank that truly hangs in a collective is reported after 30 minutes, not 10
DIST_TIMEOUT = datetime.timedelta(minutes=30)


def cuda_index(local_rank, visible):
    """The GPU of this rank among those it can see: its LOCAL_RANK under torchrun (every GPU
    of the node visible), or the one GPU that srun / a scheduler bound to it (one visible)."""
    return local_rank % visible


def placement(device, rank, world):
    """(one line per rank for rank 0 to print: where it runs, every rank's device name): a
    collective. Two ranks on one physical GPU (the same UUID) are refused: NCCL would fail
    later, less clearly."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        me = (rank, socket.gethostname(), str(device), props.name, str(getattr(props, "uuid", "")),
              os.environ.get("CUDA_VISIBLE_DEVICES", "all"))
    else:
        me = (rank, socket.gethostname(), str(device), device_name(device), "", "")
    everyone = gather_objects(me, world)
    seen = {}
    for r, host, dev, _, uuid, _ in everyone:
        if uuid.strip("0-") == "":  # none reported (some ROCm builds: all zeros)
            continue
        if uuid in seen:
            raise UserError(f"ranks {seen[uuid]} and {r} share one GPU ({dev} on {host}, "
                            f"UUID {uuid}): give each rank its own GPU (CUDA_VISIBLE_DEVICES, "
                            "srun --gpus-per-task, or torchrun's LOCAL_RANK with all GPUs visible)")
        seen[uuid] = r
    lines = [f"rank {r} on {host}: {dev} ({name}, CUDA_VISIBLE_DEVICES={vis})" if dev != "cpu"
             else f"rank {r} on {host}: {name}" for r, host, dev, name, _, vis in everyone]
    return lines, [name for _, _, _, name, _, _ in everyone]


def split_batch(batch_size, world, device_batch=None, accum_steps=None):
    """(per-device batch, accumulation steps, effective global batch). The effective batch
    can fall short of `batch_size` when the world size does not divide it; lr then scales."""
    if accum_steps is None:
        accum_steps = 1 if device_batch is None else max(1, math.ceil(
            batch_size / (world * device_batch)))
    per_device = batch_size // (world * accum_steps)
    if per_device < 1:
        raise UserError(f"global batch {batch_size} cannot be split over {world} processes x "
                        f"{accum_steps} accumulation steps")
    return per_device, accum_steps, per_device * world * accum_steps


def worker_init(worker_id):
    # torch seeds `random` and torch per worker; numpy too, for any numpy-based transform (a
    # training batch reseeds all three from its own seed: ImageFolder.__getitems__)
    np.random.seed(torch.initial_seed() % 2 ** 32)
    # Ctrl-C and SLURM's signals reach the whole process group: the main process stops the run
    # at a step boundary and needs its workers until then (they exit with it)
    for name in STOP_SIGNALS:
        signal.signal(getattr(signal, name), signal.SIG_IGN)


# Loader workers per process by default: beyond this a rank gains little (16 workers decode
# 3,700-5,400 ResNet-50 img/s, README Speed; past that --device-aug frees the CPU) and every
# worker is a process with its own transforms, Python heap and prefetched batches
WORKER_CAP = 16


def default_workers():
    """Loader workers per process: the cores this process may use (its CPU affinity, which
    SLURM and containers set) shared by the processes of this node, at most WORKER_CAP. One
    worker decodes and augments about 230-340 ResNet-50 images/s (README Speed), so a GPU
    that trains at 3,000 img/s needs 9-13 of them."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        cores = os.cpu_count() or 2
    return max(1, min(WORKER_CAP, cores // int(os.environ.get("LOCAL_WORLD_SIZE", 1))))


def make_loader(dataset, batch, workers, device, sampler, drop_last):
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch, sampler=sampler, num_workers=workers, collate_fn=collate,
        pin_memory=device.type == "cuda", drop_last=drop_last, worker_init_fn=worker_init,
        # 2 batches a worker in flight (torch's default): with 16 workers, 32 pinned batches of
        # up to 38 MB (256 x 224 px) a loader, enough to hide a slow image
        persistent_workers=workers > 0, prefetch_factor=2 if workers > 0 else None)


def to_device(loader, device, augment=None, skipped=None, decode=None):
    """The loader's batches on `device`, normalised. On CUDA, timm's PrefetchLoader: the next
    batch is copied and normalised on a side stream while the current one trains. An
    EncodedBatch (--decode device) is first decoded there by `decode(images, target, device,
    bad)`; a batch that comes with ops (--device-aug) is then augmented by `augment(images,
    ops)`. The images skipped for a batch are added to the list `skipped` when the batch is
    yielded."""
    stream = _side_stream(device) if device.type == "cuda" else None

    def load(batch):
        images, target, *rest = batch
        ops = [r for r in rest if torch.is_tensor(r)]
        bad = [p for r in rest if isinstance(r, list) for p in r]
        with torch.cuda.stream(stream) if stream else contextlib.nullcontext():
            if isinstance(images, EncodedBatch):
                images, target = decode(images, target, device, bad)
            else:
                images = images.to(device, non_blocking=True)
            if ops:
                images = augment(images, ops[0])
            images = normalize(images)
            target = target.to(device, non_blocking=True)
        return images, target, bad

    batches = iter(loader)
    ready = next(batches, None)
    ready = ready and load(ready)
    while ready is not None:
        if stream:
            current = torch.cuda.current_stream(device)
            current.wait_stream(stream)
            for t in ready[:2]:  # made on the side stream, used and freed on this one
                t.record_stream(current)
        (images, target, bad), ready = ready, next(batches, None)
        ready = ready and load(ready)
        if skipped is not None:
            skipped.extend(bad)
        yield images, target


@functools.lru_cache(maxsize=8)
def _side_stream(device):
    # one per device for the run: the caching allocator keeps freed blocks per stream, so a new
    # stream each epoch would strand the last one's blocks
    return torch.cuda.Stream(device)


def unwrap(model):
    model = getattr(model, "_orig_mod", model)  # torch.compile
    return getattr(model, "module", model)  # DDP


@torch.no_grad()
def evaluate(model, loader, device, amp_dtype=None, world=1, real=None):
    """top-1 / top-5 / CE loss; each rank sees a disjoint shard, sums are all-reduced, so the
    numbers count every image exactly once. `model` may be a list (eval.py: every checkpoint
    on each batch, one decode), then a list of results comes back. `real`: (the shard's sample
    indices in loader order, a ReaL label set per sample) adds real_top1 over the images whose
    set is not empty."""
    models = model if isinstance(model, (list, tuple)) else [model]
    for m in models:
        m.eval()
    # per model: loss, top1, top5, count, ReaL correct, ReaL count
    sums = torch.zeros(len(models), 6, dtype=torch.float64, device=device)
    seen = 0
    for images, target in to_device(loader, device):
        sets = [real[1][i] for i in real[0][seen:seen + len(target)]] if real else None
        seen += len(target)
        for k, m in enumerate(models):
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                logits = m(images)
            logits = logits.float()
            top = logits.topk(min(5, logits.shape[1]), dim=1).indices
            sums[k, 0] += F.cross_entropy(logits, target, reduction="sum")
            sums[k, 1] += (top[:, 0] == target).sum()
            sums[k, 2] += (top == target[:, None]).any(dim=1).sum()
            sums[k, 3] += target.numel()
            if sets is not None:
                sums[k, 4] += sum(p in s for p, s in zip(top[:, 0].tolist(), sets) if s)
                sums[k, 5] += sum(1 for s in sets if s)
    if world > 1:
        dist.all_reduce(sums)
    out = []
    for loss, top1, top5, count, real_ok, real_n in sums.tolist():
        n = max(count, 1)
        result = dict(top1=100 * top1 / n, top5=100 * top5 / n, loss=loss / n, images=int(count))
        if real:
            result.update(real_top1=100 * real_ok / max(real_n, 1), real_images=int(real_n))
        out.append(result)
    return out if isinstance(model, (list, tuple)) else out[0]


def gather_objects(obj, world):
    """[obj of rank 0, obj of rank 1, ...]: a collective when world > 1."""
    if world == 1:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


def on_rank0(fn, world, rank):
    """fn() run by rank 0 alone, its result on every rank (a collective: the others wait for
    it). A UserError on rank 0 is raised on every rank, so that none waits forever in a later
    collective and each says the same line."""
    result = error = failure = None
    if rank == 0:
        try:
            result = fn()
        except Exception as e:  # the others must hear of any failure, not only a UserError
            failure = e
            error = str(e) if isinstance(e, UserError) else f"rank 0: {type(e).__name__}: {e}"
    if world > 1:
        box = [result, error]
        dist.broadcast_object_list(box, src=0)
        result, error = box
    if failure is not None:
        try:
            raise failure
        finally:  # no frame -> exception -> frame cycle: it would keep the run's loaders, whose
            failure = None  # workers ignore SIGTERM (worker_init), alive at exit: a hang
    if error is not None:
        raise UserError(error)
    return result


def all_ranks_ok(error, world):
    """Collective: raise on every rank the first rank's error (None where a rank is fine)."""
    failed = [(r, e) for r, e in enumerate(gather_objects(error, world)) if e]
    if failed:
        rank, error = failed[0]
        raise UserError(error if world == 1 else f"rank {rank}: {error}")


def average_bn_stats(model, world):
    """timm train.py --dist-bn reduce (its default): BN running stats averaged over ranks
    before each evaluation and checkpoint."""
    for name, buf in model.named_buffers():
        if name.endswith(("running_mean", "running_var")):
            dist.all_reduce(buf)
            buf.div_(world)


# Checkpoints: crash-safe saves, resume, untrusted files refused

def save_checkpoint(path, state):
    """Crash-safe: written to path.tmp, fsync'd, then renamed over `path`, whose previous
    version stays as prev.pth (a hard link, no second write). A kill at any moment leaves
    `path` or prev.pth whole; a failed write (disk full) leaves both as they were and ends
    the run with one line."""
    path = Path(path)
    tmp, prev = path.with_name(path.name + ".tmp"), path.with_name("prev.pth")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        if path.exists():
            link_checkpoint(path, prev)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        kept = f"; {path} still holds the previous checkpoint" if path.exists() else ""
        raise UserError(f"cannot write checkpoint {path}: {e.strerror or e}{kept}") from None


def _fsync_dir(folder):
    """Make a rename durable (POSIX); a no-op where directories cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def link_checkpoint(src, dst):
    """dst becomes the same file as src without writing it again (a hard link where the file
    system has them); the next save of src makes a new file, so dst keeps this one."""
    tmp = Path(str(dst) + ".tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def load_checkpoint(path):
    """A checkpoint's contents, loaded with weights_only=True: tensors, numbers, strings and
    containers only. A file holding any other pickled object is refused, never executed."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "Weights only load failed" in str(e):
            raise UserError(f"refusing checkpoint {path}: it holds pickled Python objects, "
                            "not only tensors, and loading it could run code") from None
        raise UserError(f"cannot read checkpoint {path}: {str(e).splitlines()[0]}") from None
    except Exception as e:
        raise UserError(f"cannot read checkpoint {path}: {str(e).splitlines()[0]}") from None


def resume_checkpoint(resume, out, log):
    """(checkpoint, path) to continue from, or (None, None). --resume auto takes the run
    folder's newest checkpoint that loads (last.pth, else prev.pth, saying why it skipped
    last.pth) and starts afresh where there is none, so one command line serves the first
    start and every restart; --resume PATH takes that file."""
    if not resume:
        if (out / "last.pth").exists():
            raise UserError(f"{out} already holds a checkpoint (last.pth): pass --resume auto "
                            "to continue it, or choose another --output")
        return None, None
    if resume != "auto":
        return load_checkpoint(resume), Path(resume)
    candidates = [p for p in (out / "last.pth", out / "prev.pth") if p.exists()]
    for path in candidates:
        try:
            return load_checkpoint(path), path
        except UserError as e:
            log(f"warning: skipping {e} (truncated or corrupt)")
    if candidates:
        raise UserError(f"no checkpoint in {out} can be read: start afresh with another --output")
    log(f"--resume auto: no checkpoint in {out} yet, starting from scratch")
    return None, None


def save_id(ckpt):
    """What tells two saves of a run apart: where they continue and the run's time at saving."""
    return (tuple(ckpt.get("next") or ()), ckpt.get("epoch"), ckpt.get("elapsed_s"))


def agree_checkpoint(resume, out, log, world, rank):
    """resume_checkpoint() decided by rank 0; every other rank loads the same path and must
    find the same save there (a collective)."""
    mine = {}

    def choose():
        mine["ckpt"], path = resume_checkpoint(resume, out, log)
        return None if path is None else (str(path), save_id(mine["ckpt"]))
    choice = on_rank0(choose, world, rank)
    if choice is None:
        return None, None
    path, error = Path(choice[0]), None
    if rank != 0:
        try:
            mine["ckpt"] = load_checkpoint(path)
            if save_id(mine["ckpt"]) != choice[1]:
                error = "another save than rank 0's"
        except UserError as e:
            error = str(e)
    if error:
        error = (f"cannot resume from {path}, the checkpoint rank 0 continues: {error}; every "
                 "node must see the same --output folder (a shared file system)")
    all_ranks_ok(error, world)
    return mine["ckpt"], path


def trim_metrics(path, epochs):
    """Keep the rows of the first `epochs` epochs: a run killed after writing an epoch's row
    but before its checkpoint repeats that epoch, and must not log it twice."""
    if not path.exists():
        return
    rows = [line for line in path.read_text().splitlines()
            if line.strip() and json.loads(line)["epoch"] <= epochs]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in rows))
    os.replace(tmp, path)


def state_dict_of(obj):
    """Model weights from our checkpoint, timm's train checkpoint or a plain state dict."""
    if isinstance(obj, dict):
        for key in ("model", "state_dict", "model_state_dict"):
            if isinstance(obj.get(key), dict):
                return obj[key]
        if obj and all(torch.is_tensor(v) for v in obj.values()):
            return obj
    raise UserError("checkpoint holds no model state dict")


# Precision and the batch's augmentation on the device

def amp_dtype_for(device, recipe, amp_dtype="auto"):
    """The autocast dtype, None for float32. auto: on CUDA where the recipe uses AMP, bf16 on
    GPUs with bf16 units (compute capability 8.0 on: A100, H100, RTX 30xx on), else fp16 with
    a grad scaler (V100, T4: torch.cuda.is_bf16_supported() is true there, but emulated and
    slow); float32 on a CPU. bf16 / fp16 are honoured on any device when asked for."""
    if amp_dtype == "bf16":
        return torch.bfloat16
    if amp_dtype == "fp16":
        return torch.float16
    if amp_dtype == "off" or not recipe["amp"] or device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.get_device_capability(device) >= (8, 0) else torch.float16


def augment_batch(images, target, recipe, num_classes, mix_rng):
    """Random erasing and Mixup / CutMix on the normalised batch on its device, in the
    reference's order: timm mixes in its collate function and its prefetcher erases the mixed
    batch; tv erases each image in its transforms and mixes in the collate function."""
    def erase(x):
        if recipe["reprob"] and recipe["remode"] == "pixel":
            random_erasing(x, recipe["reprob"], recipe["recount"])
        elif recipe["reprob"]:  # remode "tv"
            tv_random_erasing(x, recipe["reprob"])

    def mix(x, y):
        if recipe["mixup"] > 0 or recipe["cutmix"] > 0:
            return mixup_cutmix(x, y, num_classes, recipe["mixup"], recipe["cutmix"],
                                recipe["label_smoothing"], mix_rng, recipe["mixup_style"])
        return x, y
    if recipe["mixup_style"] == "timm":
        images, target = mix(images, target)
        erase(images)
    else:
        erase(images)
        images, target = mix(images, target)
    return images, target


def amp_name(amp_dtype):
    return {torch.bfloat16: "bf16 autocast", torch.float16: "fp16 autocast + grad scaler"}.get(
        amp_dtype, "float32")


# Stopping: signals, non-finite losses; both decided by all ranks together

STOP_SIGNALS = tuple(n for n in ("SIGTERM", "SIGINT", "SIGUSR1") if hasattr(signal, n))
EXIT_STOPPED = 75  # EX_TEMPFAIL: stopped by a signal after saving; --resume auto continues


class Stopped(Exception):
    """The run stopped on a signal after writing its checkpoint."""


class StopRequest:
    """SIGTERM (preemption), SIGUSR1 (SLURM's --signal warning) and Ctrl-C ask the run to stop:
    the handler only notes the signal, the loop finishes its step, every rank agrees, and a
    checkpoint is written before the process exits. A second Ctrl-C interrupts at once."""

    def __init__(self):
        self.signum, self.previous = 0, {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for name in STOP_SIGNALS:
                num = getattr(signal, name)
                self.previous[num] = signal.signal(num, self._handle)
        return self

    def __exit__(self, *exc):
        for num, handler in self.previous.items():
            signal.signal(num, handler)

    def _handle(self, signum, frame):
        if self.signum and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum


def rank_maxima(values, world):
    """Collective: the maxima over ranks of a few int64 scalars, as a list (one all-reduce,
    one sync), so that every rank takes the same decision at the same step (one rank breaking
    alone would leave the others waiting in DDP's next all-reduce)."""
    flags = torch.stack(values)
    if world > 1:
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    return flags.tolist()


def poll_flags(bad_steps, streak, stop, save, world):
    """Collective: (non-finite losses, of them in a row, stop asked, save due), the maxima
    over ranks."""
    return rank_maxima([bad_steps, streak, torch.full_like(bad_steps, int(stop)),
                        torch.full_like(bad_steps, int(save))], world)


SKIPPED_IN_A_ROW = 25  # fp16: non-finite losses in a row that end a run (65536 -> 1 is 17 halvings)


def nonfinite_stop(bad, in_a_row, scaler):
    """Without a grad scaler any non-finite loss stops the run before a step poisons the
    weights; with fp16's scaler a non-finite loss is a step GradScaler skips (it lowers the
    scale), and only SKIPPED_IN_A_ROW of them in a row, on any rank, stop it."""
    return in_a_row >= SKIPPED_IN_A_ROW if scaler.is_enabled() else bad > 0


# Run records: data wait, memory, provenance, TensorBoard, summary

def timed(iterable, waited):
    """The items of `iterable`; the seconds spent waiting for them are added to waited[0]."""
    iterator = iter(iterable)
    while True:
        t = time.perf_counter()
        try:
            item = next(iterator)
        except StopIteration:
            return
        waited[0] += time.perf_counter() - t
        yield item


def peak_memory(device):
    """This epoch's peak device memory on CUDA; the process's peak resident memory (all
    epochs, what the OS counts) elsewhere."""
    if device.type == "cuda":
        return dict(peak_mem_gb=round(torch.cuda.max_memory_allocated(device) / 2 ** 30, 2))
    try:
        import resource
    except ImportError:  # Windows
        return {}
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return dict(peak_rss_gb=round(rss * (1 if sys.platform == "darwin" else 1024) / 2 ** 30, 2))


def device_name(device):
    return torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"cpu ({os.cpu_count()} cores)"


def code_version():
    """(git commit of this code, whether tracked files differ from it), (None, None) outside a
    git checkout or without git."""
    root = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                                text=True, timeout=10)
        if commit.returncode != 0:
            return None, None
        diff = subprocess.run(["git", "diff", "--quiet", "HEAD", "--"], cwd=root,
                              capture_output=True, timeout=30)
        return commit.stdout.strip(), diff.returncode != 0
    except (OSError, subprocess.SubprocessError):
        return None, None


def add_provenance(path, facts):
    """Append this start's provenance to `path` (a JSON list, one entry per start or resume):
    what a reproduction that falls short is asked for (timm #504, #2618; tv #3995)."""
    import PIL
    import platform
    from importlib import metadata  # torchvision's version without importing it (1-3 s)
    try:
        tv_version = metadata.version("torchvision")
    except metadata.PackageNotFoundError:
        tv_version = None
    commit, modified = code_version()
    entry = dict(time=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                 command=[sys.executable, *sys.argv], cwd=os.getcwd(), host=socket.gethostname(),
                 git_commit=commit, git_modified=modified, python=platform.python_version(),
                 torch=torch.__version__, torchvision=tv_version,
                 pillow=PIL.__version__, numpy=np.__version__, cuda=torch.version.cuda,
                 cudnn=torch.backends.cudnn.version() if torch.cuda.is_available() else None,
                 **facts)
    entries = json.loads(path.read_text()) if path.exists() else []
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(entries + [entry], indent=1) + "\n")
    os.replace(tmp, path)


def tensorboard_writer(folder):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UserError("--tensorboard needs the tensorboard package: pip install tensorboard "
                        "(or pip install -r requirements-extra.txt)") from None
    return SummaryWriter(str(folder))


def write_summary(out, recipe, seconds, device_seconds):
    """summary.json from the run's metrics.jsonl: final and best top-1 of the model and the
    EMA, the epoch of each best, hours, device-hours (hours x processes, summed over starts),
    mean train img/s, and the published top-1 of the recipe."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    summary = dict(recipe=recipe["recipe"], model=recipe["model"], epochs=len(rows),
                   final_top1=rows[-1]["top1"],
                   best_top1=max(r["top1"] for r in rows),
                   best_epoch=max(rows, key=lambda r: r["top1"])["epoch"])
    if "ema_top1" in rows[-1]:
        best_ema = max(rows, key=lambda r: r["ema_top1"])
        summary.update(final_ema_top1=rows[-1]["ema_top1"], best_ema_top1=best_ema["ema_top1"],
                       best_ema_epoch=best_ema["epoch"])
    summary.update(hours=round(seconds / 3600, 4), device_hours=round(device_seconds / 3600, 4),
                   train_img_s=round(statistics.mean(r["train_img_s"] for r in rows), 1),
                   paper_top1=recipe.get("paper_top1"), top1_source=recipe.get("top1_source"))
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def summary_line(s):
    ema = (f"; EMA {s['final_ema_top1']:.2f} (best {s['best_ema_top1']:.2f} at epoch "
           f"{s['best_ema_epoch']})" if "final_ema_top1" in s else "")
    return (f"summary: {s['recipe']} {s['model']}, {s['epochs']} epochs: top-1 "
            f"{s['final_top1']:.2f} (best {s['best_top1']:.2f} at epoch {s['best_epoch']})"
            f"{ema}; published {s['paper_top1']} ({s['top1_source']}); {s['hours']:.2f} h, "
            f"{s['device_hours']:.2f} device-hours, {s['train_img_s']:,.0f} train img/s")


# The run: train() and its steps, in the order they happen

def train(recipe, args):
    """One run, top to bottom; `run` carries its parts from one step to the next."""
    run = SimpleNamespace(args=args, started=time.perf_counter(), out=Path(args.output))
    if not Path(args.data).is_dir():
        raise UserError(f"data folder {args.data} does not exist")
    run.device, run.rank, run.world = setup_device(args.device)
    run.log = print if run.rank == 0 else (lambda *a, **k: None)
    where, run.device_names = placement(run.device, run.rank, run.world)
    if run.world > 1 or run.device.type == "cuda":
        run.log("\n".join(where))
    plan_batch(run, recipe)   # per-device batch, accumulation; lr scaled to the global batch
    make_data(run)            # datasets, samplers, loaders, steps an epoch
    make_model(run)           # model, optimizer, grad scaler, precision, loss function
    resume(run)               # where to start: --resume's checkpoint, or the beginning
    open_run_folder(run)      # recipe.json, provenance.json, metrics.jsonl up to the start
    wrap_model(run)           # DDP, the EMA (after DDP's broadcast), torch.compile
    with StopRequest() as run.stop:
        for epoch in range(run.start_epoch, run.recipe["epochs"]):
            first = run.start_step if epoch == run.start_epoch else 0
            sums = train_epoch(run, epoch, first)
            end_epoch(run, epoch, first, sums)
    finish(run)
    return run.best


def linear_lr(recipe, batch, why):
    """The recipe at global batch `batch` with its lr scaled linearly (Goyal et al. 2017, as
    timm's and tv's users do), and the line that says so: the one place lr follows the batch."""
    lr = recipe["lr"] * batch / recipe["batch_size"]
    return dict(recipe, lr=lr, batch_size=batch), (
        f"global batch {batch} ({why}), not the recipe's {recipe['batch_size']}: lr "
        f"{recipe['lr']:g} -> {lr:g} (linear scaling)")


def plan_batch(run, recipe):
    per_device, accum, effective = split_batch(recipe["batch_size"], run.world,
                                              run.args.device_batch, run.args.accum_steps)
    if effective != recipe["batch_size"]:
        recipe, note = linear_lr(recipe, effective,
                                 f"{run.world} x {per_device} x {accum} accumulation")
        run.log(note)
    run.log(f"{run.world} process(es) on {run.device}, {per_device} images per device x {accum} "
            f"accumulation step(s) = global batch {effective}")
    run.recipe, run.per_device, run.accum = recipe, per_device, accum


def make_data(run):
    args, recipe, rank, world = run.args, run.recipe, run.rank, run.world
    if args.workers:
        chosen = (f" (the cores per process, at most {WORKER_CAP}: each worker holds its own "
                  "memory)" if args.workers_default else "")
        run.log(f"{args.workers} loader worker(s) per process{chosen}: at about 230-340 "
                f"ResNet-50 img/s each (README Speed) they feed up to ~{230 * args.workers:,}-"
                f"{340 * args.workers:,} img/s per process; --workers to change")
    if args.decode == "device":
        run.log(f"--decode device: JPEGs decoded on {run.device.type} with "
                f"{jpeg_decoder()[0]}" + ("" if run.device.type == "cuda" else
                                          ", in the main process, slower than the workers: "
                                          "it is meant for GPUs"))
    elif args.device_aug and run.device.type != "cuda":
        run.log(f"note: --device-aug on {run.device.type} runs the augmentation in the main "
                "process, slower than in the workers; it is meant for GPUs")
    root, t0 = Path(args.data), time.perf_counter()
    # rank 0 lists, the others wait (DIST_TIMEOUT): on a shared file system every rank listing
    # 1.28M files at once is minutes of metadata load, and ranks would start far apart
    train_list, val_list = on_rank0(lambda: (list_folder(root / "train"),
                                             list_folder(root / "val")), world, rank)
    run.log(f"{len(train_list[0]):,} train and {len(val_list[0]):,} val images in "
            f"{len(train_list[1])} classes, listed in {time.perf_counter() - t0:.1f} s")
    run.train_set = ImageFolder(root / "train", TrainTransform(
        recipe["train_size"], recipe["interpolation"], recipe["auto_augment"],
        fast_decode=args.fast_decode, device_aug=args.device_aug, decode=args.decode),
        skip_bad=args.bad_images == "skip", listing=train_list)
    val_set = ImageFolder(root / "val", EvalTransform(
        recipe["eval_size"], recipe["eval_resize"], recipe["interpolation"]), listing=val_list)
    if val_set.classes != run.train_set.classes:
        raise UserError(f"{root}/val has other class folders than {root}/train")
    order_seed, batch_seed = seed_for(args.seed, SEED_ORDER), seed_for(args.seed, SEED_BATCH)
    if recipe["repeated_aug"]:
        run.sampler = RepeatedAugSampler(len(run.train_set), recipe["repeated_aug"], world, rank,
                                         order_seed, batch=run.per_device, batch_seed=batch_seed)
    else:
        run.sampler = TrainSampler(len(run.train_set), run.per_device, run.accum, world, rank,
                                   order_seed, batch_seed)
    run.train_loader = make_loader(run.train_set, run.per_device, args.workers, run.device,
                                   run.sampler, True)
    run.val_loader = make_loader(val_set, args.eval_batch or run.per_device, args.workers,
                                 run.device, list(range(rank, len(val_set), world)), False)
    run.steps = len(run.train_loader) // run.accum * run.accum
    if run.steps == 0:
        raise UserError(f"{root}/train has {len(run.train_set)} images, fewer than one step of "
                        f"{world} x {run.per_device} x {run.accum}: lower --batch-size")


def make_model(run):
    args, recipe, device = run.args, run.recipe, run.device
    torch.manual_seed(seed_for(args.seed, SEED_MODEL))  # the same initial weights on every rank
    run.model = create_model(recipe["model"], len(run.train_set.classes), recipe["dropout"],
                             recipe["drop_path"], recipe["zero_init_last"]).to(device)
    run.channels_last = args.channels_last if args.channels_last is not None else \
        device.type == "cuda"
    if run.channels_last:
        run.model.to(memory_format=torch.channels_last)
    run.optimizer = create_optimizer(run.model, recipe)
    run.amp_dtype = amp_dtype_for(device, recipe, args.amp_dtype)
    run.log(f"precision {amp_name(run.amp_dtype)}, channels_last "
            f"{'on' if run.channels_last else 'off'}")
    # fp16 needs loss scaling; otherwise the scaler is disabled and each of its calls is a no-op
    run.scaler = torch.amp.GradScaler(device.type, enabled=run.amp_dtype == torch.float16)
    run.noise_seed = seed_for(args.seed, SEED_NOISE)
    if recipe["loss"] == "bce":
        run.loss_fn = functools.partial(binary_cross_entropy, smoothing=recipe["label_smoothing"],
                                        target_thresh=recipe["bce_target_thresh"])
    else:
        run.loss_fn = functools.partial(cross_entropy, smoothing=recipe["label_smoothing"])


def resume(run):
    """The checkpoint's weights, optimizer and scaler, and where it stopped: an epoch's end, or
    (epoch, step) inside one with every rank's running sums of that epoch. Rank 0, which
    writes the checkpoints, chooses the file; every rank loads that one and checks it is the
    same save, or every rank stops with one line (a node that sees another --output folder
    would otherwise train another model until a collective hangs)."""
    run.ckpt, path = agree_checkpoint(run.args.resume, run.out, run.log, run.world, run.rank)
    run.resumed_from, run.start_epoch, run.start_step, run.best = path, 0, 0, -1.0
    run.partial, run.elapsed_before, run.device_s_before = None, 0.0, 0.0
    run.last_good = None  # (path, where) of the newest good checkpoint, said on a nan loss
    ckpt, model_name = run.ckpt, run.recipe["model"]
    if ckpt is None:
        return
    if ckpt.get("recipe", {}).get("model") not in (None, model_name):
        raise UserError(f"checkpoint {path} is a {ckpt['recipe']['model']}, this run trains a "
                        f"{model_name}")
    load_weights(run.model, state_dict_of(ckpt), f"checkpoint {path}")
    if "optimizer" in ckpt:
        run.optimizer.load_state_dict(ckpt["optimizer"])
    if run.scaler.is_enabled() and ckpt.get("scaler"):
        run.scaler.load_state_dict(ckpt["scaler"])
    # "next": the (epoch, step) a checkpoint continues at; older ones end an epoch
    run.start_epoch, run.start_step = ckpt.get("next", (ckpt.get("epoch", -1) + 1, 0))
    run.best, run.partial = ckpt.get("best_top1", -1.0), ckpt.get("partial")
    # time before this start: the summary's hours and device-hours count every start
    run.elapsed_before, run.device_s_before = ckpt.get("elapsed_s", 0.0), ckpt.get("device_s", 0.0)
    if run.start_step and (run.partial is None or ckpt.get("world") != run.world
                           or ckpt.get("steps") != run.steps):
        raise UserError(f"{path} stopped inside epoch {run.start_epoch + 1} with "
                        f"{ckpt.get('world')} process(es) x {ckpt.get('steps')} steps; this run "
                        f"has {run.world} x {run.steps}: resume it with the same world size and "
                        "batch, or from the epoch's end (prev.pth or an earlier run)")
    run.log(f"resumed from {path} at epoch {run.start_epoch + 1}"
            + (f", step {run.start_step + 1} of {run.steps}" if run.start_step else ""))
    run.last_good = (path, where_next(run, run.start_epoch - (not run.start_step),
                                      run.start_step))


def open_run_folder(run):
    """Rank 0 writes recipe.json, appends this start to provenance.json (with every rank's
    device name, from placement) and drops metrics rows past the checkpoint; a failure there
    reaches every rank."""
    run.tensorboard, run.reported, run.last_save = None, set(), time.monotonic()
    on_rank0(lambda: write_run_folder(run), run.world, run.rank)


def write_run_folder(run):
    out, args = run.out, run.args
    out.mkdir(parents=True, exist_ok=True)
    (out / "recipe.json").write_text(json.dumps(run.recipe, indent=1) + "\n")
    trim_metrics(out / "metrics.jsonl", run.start_epoch)
    add_provenance(out / "provenance.json", dict(
        devices=run.device_names, world_size=run.world, device_batch=run.per_device,
        accum_steps=run.accum, workers=args.workers, precision=amp_name(run.amp_dtype),
        channels_last=run.channels_last, compile=bool(args.compile), seed=args.seed,
        resumed_from=run.resumed_from and str(run.resumed_from),
        start_epoch=run.start_epoch + 1, start_step=run.start_step + 1))
    if args.tensorboard:
        run.tensorboard = tensorboard_writer(args.tensorboard)


def wrap_model(run):
    run.ddp_model = run.model
    if run.world > 1:  # DDP broadcasts rank 0's weights and buffers here
        run.ddp_model = nn.parallel.DistributedDataParallel(
            run.model, device_ids=[run.device.index] if run.device.type == "cuda" else None)
    make_ema(run)
    run.ckpt = None  # its weights and optimizer state are copied: free them for the run
    if run.args.compile:
        run.ddp_model = torch.compile(run.ddp_model)


def make_ema(run):
    """The EMA of the recipe's style, from the weights every rank trains (so after DDP's
    broadcast), with the checkpoint's state when resuming."""
    recipe, run.ema = run.recipe, None
    if not recipe["ema_decay"]:
        return
    decay = recipe["ema_decay"]
    if recipe["ema_style"] == "tv":
        # tv's batch per GPU is the images a rank sees between two optimizer steps: ours
        # with accumulation is per_device x accum (tv has none)
        decay = tv_ema_decay(decay, run.world, run.per_device * run.accum, recipe["ema_every"],
                             recipe["epochs"])
        run.log(f"EMA decay {recipe['ema_decay']:g} adjusted as tv's train.py: {decay:.6g}")
    run.ema = EMA(run.model, decay, tf_warmup=recipe["ema_style"] == "tf",
                  copy_first=recipe["ema_style"] == "tv")
    if run.ckpt is not None and run.ckpt.get("ema"):
        run.ema.load_state_dict(run.ckpt["ema"])


def train_epoch(run, epoch, first):
    """Steps `first`..steps-1 of the epoch. Returns this rank's sums (finite losses, non-finite
    ones, of them in a row, unreadable images); raises Stopped after a checkpoint when a
    signal asks; stops early on a non-finite loss (end_epoch raises)."""
    args, device = run.args, run.device
    save_every = (args.save_every_minutes or 0) * 60
    run.sampler.set_epoch(epoch, skip=first)  # the batches before `first` are not decoded
    run.ddp_model.train()
    sums = torch.zeros(4, dtype=torch.float64, device=device)
    if first:
        sums.copy_(run.partial[run.rank])
    run.skipped, counted, pending, run.nonfinite = [], 0, None, False
    run.t0, run.waited = time.perf_counter(), [0.0]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    bar = progress_bar(run, epoch, first)
    transform = run.train_set.transform
    decode = functools.partial(transform.decode_batch, skip_bad=run.train_set.skip_bad)
    batches = timed(to_device(run.train_loader, device, transform.on_device, run.skipped,
                              decode), run.waited)
    for step, (images, target) in zip(range(first, run.steps), batches):
        loss, last_micro = train_step(run, images, target, epoch, step)
        finite = torch.isfinite(loss)
        sums[0] += torch.where(finite, loss, 0.0)
        sums[1] += ~finite
        sums[2] = torch.where(finite, 0.0, sums[2] + 1)
        if len(run.skipped) > counted:  # rare: no host-to-device copy otherwise
            sums[3] += len(run.skipped) - counted
            counted = len(run.skipped)
        if bar is not None:
            bar.update()
            if (step + 1) % args.log_interval == 0 or step + 1 == run.steps:
                seen = (step + 1 - first) * run.per_device * run.world
                bar.set_postfix(loss=f"{sums[0].item() / (step + 1):.4f}", lr=f"{run.lr:.3g}",
                                img_s=f"{seen / (time.perf_counter() - run.t0):.0f}")
        save_due = bool(save_every) and time.monotonic() - run.last_save >= save_every
        if (step + 1) % args.log_interval == 0:  # all ranks, the same steps: one sync
            bad, in_a_row, stop_asked, save_asked = poll_flags(
                sums[1].long(), sums[2].long(), run.stop.signum, save_due and run.rank == 0,
                run.world)
            if nonfinite_stop(bad, in_a_row, run.scaler):
                run.nonfinite = True
                break
            pending = (stop_asked, save_asked) if stop_asked or save_asked else pending
        elif run.world == 1 and (run.stop.signum or save_due):  # no collective needed
            pending = (run.stop.signum, save_due)
        if pending and last_micro and step + 1 < run.steps:  # between updates only
            if not healthy(run, sums):  # a non-finite loss since the last poll: no save
                run.nonfinite = True
                break
            checkpoint(run, epoch, step + 1, sums)
            if pending[0]:
                if bar is not None:
                    bar.close()
                raise Stopped(f"epoch {epoch + 1}, step {step + 1} of {run.steps}")
            pending = None
    if bar is not None:
        bar.close()
    return sums


def weights_bad(model):
    """A 0-dim bool tensor (no sync): whether any weight of `model` is nan or inf."""
    return torch.stack([~torch.isfinite(p).all() for p in model.parameters()]).any()


def healthy(run, sums):
    """Collective, before a save inside an epoch: no non-finite loss this epoch that stops the
    run (nonfinite_stop) and finite weights on every rank."""
    bad, in_a_row, weights = rank_maxima([sums[1].long(), sums[2].long(),
                                          weights_bad(run.model).long()], run.world)
    return not weights and not nonfinite_stop(bad, in_a_row, run.scaler)


def seed_step(seed, epoch, step, rank):
    """Seed the main process's streams for one micro-step from (seed, epoch, step, rank):
    Python's (erasing's geometry), NumPy's and torch's (erasing's noise, drop path, dropout) by
    seed_all, and return the NumPy generator Mixup / CutMix draw from (another stream)."""
    step_seed = seed_for(seed, SEED_STEP, epoch, step, rank)
    seed_all(step_seed)
    return np.random.default_rng(step_seed)


def train_step(run, images, target, epoch, step):
    """One micro-step; an optimizer update (clip, step, EMA) at the last of `accum`. Returns
    the loss (detached, float64) and whether an update happened."""
    recipe, model, optimizer, scaler = run.recipe, run.model, run.optimizer, run.scaler
    # erasing, Mixup/CutMix, drop path and dropout draw from streams seeded here: a function
    # of (seed, epoch, step, rank), so a run resumed at any step continues exactly
    mix_rng = seed_step(run.args.seed, epoch, step, run.rank)
    t = epoch + (step // run.accum * run.accum) / run.steps if recipe["sched_per_step"] \
        else epoch
    run.lr = lr_at(t, recipe, noise_seed=run.noise_seed)
    for group in optimizer.param_groups:
        group["lr"] = run.lr
    if not run.channels_last:
        images = images.contiguous()
    images, target = augment_batch(images, target, recipe, len(run.train_set.classes),
                                   mix_rng)
    last_micro = (step + 1) % run.accum == 0
    # DDP all-reduces gradients at the last micro-step of an update only
    sync = run.ddp_model.no_sync() if run.world > 1 and not last_micro \
        else contextlib.nullcontext()
    with sync:
        with torch.autocast(run.device.type, dtype=run.amp_dtype,
                            enabled=run.amp_dtype is not None):
            logits = run.ddp_model(images)
        loss = run.loss_fn(logits.float(), target)
        scaler.scale(loss / run.accum).backward()
    if last_micro:
        if recipe["clip"]:
            scaler.unscale_(optimizer)  # timm clips the true gradients
            clip_gradients(model, recipe["clip"])
        scaler.step(optimizer)  # skipped by fp16's scaler when a gradient is not finite
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        # the EMA after every ema_every-th update of the epoch; tv's copies it in the warmup
        if run.ema is not None and step // run.accum % recipe["ema_every"] == 0:
            run.ema.update(model, copy=recipe["ema_style"] == "tv"
                           and epoch < recipe["warmup_epochs"])
    return loss.detach().double(), last_micro


def progress_bar(run, epoch, first):
    if run.rank != 0 or run.args.quiet:
        return None
    from tqdm import tqdm
    return tqdm(total=run.steps, initial=first, leave=False, dynamic_ncols=True,
                desc=f"epoch {epoch + 1}/{run.recipe['epochs']}", mininterval=1.0)


def end_epoch(run, epoch, first, sums):
    """The epoch's row: losses summed over ranks (a non-finite one ends the run), unreadable
    images named, BN statistics averaged, model and EMA evaluated; metrics.jsonl, the
    checkpoint, best.pth; a signal during all this stops the run here."""
    world, scaler = run.world, run.scaler
    # with the ranks' sums, whether a rank's weights are not finite (none is saved then)
    totals = torch.cat([sums, weights_bad(run.model).to(sums.dtype)[None]])
    if world > 1:
        dist.all_reduce(totals)
    loss_total, bad = totals[0].item(), int(totals[1].item())
    good = run.steps * world - bad
    if run.nonfinite or (bad and not scaler.is_enabled()) or good <= 0 \
            or not math.isfinite(loss_total) or totals[4].item():
        absorbed = " (more than fp16 loss scaling can absorb)" if scaler.is_enabled() else ""
        kept = "no checkpoint was written: start again with a lower --lr"
        if run.last_good:
            kept = (f"{run.last_good[0]} holds the last good checkpoint ({run.last_good[1]}): "
                    "continue from it with a lower --lr")
        raise UserError(f"training loss became nan/inf in epoch {epoch + 1} (lr {run.lr:g}, "
                        f"{bad} step(s){absorbed}); {kept}")
    train_time = time.perf_counter() - run.t0
    bad_images = int(totals[3].item())
    if bad_images:
        report_skipped(run)
    if world > 1:
        average_bn_stats(run.model, world)
        if run.ema is not None:
            average_bn_stats(run.ema.module, world)
    # the plain model, not DDP's: ranks may hold different numbers of eval batches, and DDP's
    # forward could wait on a collective. With an EMA both score each batch: one decode
    models = [run.model] + ([run.ema.module] if run.ema is not None else [])
    scores = evaluate(models, run.val_loader, run.device, run.amp_dtype, world)
    metrics = scores[0]
    row = dict(epoch=epoch + 1, lr=float(f"{run.lr:.6g}"),
               train_loss=round(loss_total / good, 5), top1=round(metrics["top1"], 3),
               top5=round(metrics["top5"], 3), val_loss=round(metrics["loss"], 5))
    if run.ema is not None:
        # timm and tv: the EMA weights are the result; timm keeps the best by their top-1
        metrics = scores[1]
        row.update(ema_top1=round(metrics["top1"], 3), ema_top5=round(metrics["top5"], 3))
    is_best = metrics["top1"] > run.best
    run.best = max(run.best, metrics["top1"])
    if scaler.is_enabled():  # steps GradScaler skipped for a non-finite loss, its scale
        row.update(skipped_steps=bad, grad_scale=scaler.get_scale())
    row.update(best_top1=round(run.best, 3), val_images=metrics["images"],
               bad_images=bad_images, data_wait=round(run.waited[0] / train_time, 3),
               **peak_memory(run.device),
               train_img_s=round((run.steps - first) * run.per_device * world / train_time, 1),
               epoch_s=round(time.perf_counter() - run.t0, 1))
    run.log(" ".join(f"{k} {v}" for k, v in row.items()), flush=True)
    checkpoint(run, epoch, 0, sums, row, best=is_best)  # and the row to metrics.jsonl
    if epoch + 1 < run.recipe["epochs"] and poll_flags(
            sums[1].long(), sums[2].long(), run.stop.signum, False, world)[2]:
        raise Stopped(f"the end of epoch {epoch + 1}")


def report_skipped(run):
    """Name each unreadable image once a run (rank 0, from every rank's list: a collective)."""
    lists = gather_objects(run.skipped, run.world)
    for line in sorted({p for part in lists for p in part} - run.reported):
        run.log(f"warning: skipped unreadable image {line}")
        run.reported.add(line)


def log_row(run, row):
    with open(run.out / "metrics.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")
    if run.tensorboard is not None:
        for key, value in row.items():
            if key != "epoch":
                run.tensorboard.add_scalar(key, value, row["epoch"])
        run.tensorboard.flush()


def checkpoint(run, epoch, next_step, sums, row=None, best=False):
    """Everything the rest of the run depends on. The random streams need no saving: every
    step reseeds them from (seed, epoch, step, rank), and the loader's from (seed, epoch,
    batch). Mid-epoch (next_step > 0) the epoch's running sums of every rank come along (a
    collective), so that the resumed epoch's row is the uninterrupted one's."""
    gathered = None
    if next_step:
        gathered = [torch.zeros_like(sums) for _ in range(run.world)] if run.world > 1 \
            else [sums]
        if run.world > 1:
            dist.all_gather(gathered, sums)
    run.last_save = time.monotonic()
    # every rank waits for rank 0's file (and fails with it): a rank that exited first would make
    # torchrun stop the others, rank 0 in the middle of its write, or restart the group
    on_rank0(lambda: write_checkpoint(run, epoch, next_step, gathered, row, best), run.world,
             run.rank)
    run.last_good = (run.out / "last.pth", where_next(run, epoch, next_step))


def where_next(run, epoch, next_step):
    return (f"epoch {epoch + 1}, step {next_step + 1} of {run.steps}" if next_step
            else f"the end of epoch {epoch + 1}")


def write_checkpoint(run, epoch, next_step, gathered, row, best):
    """Rank 0's save: the epoch's row, last.pth (prev.pth keeps the one before), best.pth
    linked to it."""
    if row is not None:  # before the checkpoint: a resume drops rows past it (trim_metrics)
        log_row(run, row)
    elapsed = time.perf_counter() - run.started
    state = dict(model=run.model.state_dict(), optimizer=run.optimizer.state_dict(),
                 ema=run.ema.state_dict() if run.ema is not None else None,
                 scaler=run.scaler.state_dict() if run.scaler.is_enabled() else None,
                 epoch=epoch - 1 if next_step else epoch, best_top1=run.best,
                 recipe=run.recipe, classes=run.train_set.classes, world=run.world,
                 steps=run.steps, seed=run.args.seed, elapsed_s=run.elapsed_before + elapsed,
                 device_s=run.device_s_before + elapsed * run.world,
                 next=(epoch, next_step) if next_step else (epoch + 1, 0))
    if next_step:
        state["partial"] = torch.stack(gathered).cpu()
    if row is not None:
        state["metrics"] = row
    save_checkpoint(run.out / "last.pth", state)
    if best:
        link_checkpoint(run.out / "last.pth", run.out / "best.pth")


def finish(run):
    def summarise():
        if run.tensorboard is not None:
            run.tensorboard.close()
        elapsed = time.perf_counter() - run.started
        run.log(summary_line(write_summary(run.out, run.recipe, run.elapsed_before + elapsed,
                                           run.device_s_before + elapsed * run.world)))
    on_rank0(summarise, run.world, run.rank)
    if run.world > 1:
        dist.barrier()
        dist.destroy_process_group()


# ==================================================================================================
# Demo data: a small, deterministic ImageFolder of synthetic shapes, written as real JPEGs
# ==================================================================================================

DEMO_CLASSES = ("disc", "square", "triangle", "ring", "hstripes", "vstripes", "checker", "cross")


def draw_demo_image(label, rng, size=72):
    """One picture of class `label`: a shape or texture in random colours, place and scale."""
    def colour():
        return tuple(rng.randint(0, 255) for _ in range(3))
    bg = colour()
    fg = colour()
    while sum(abs(a - b) for a, b in zip(bg, fg)) < 200:
        fg = colour()
    img = Image.new("RGB", (size, size), bg)
    d = ImageDraw.Draw(img)
    r = rng.uniform(0.22, 0.4) * size
    cx, cy = rng.uniform(r, size - r), rng.uniform(r, size - r)
    name = DEMO_CLASSES[label]
    if name == "disc":
        d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fg)
    elif name == "square":
        d.rectangle((cx - r * 0.85, cy - r * 0.85, cx + r * 0.85, cy + r * 0.85), fill=fg)
    elif name == "triangle":
        d.polygon([(cx, cy - r), (cx - r, cy + r * 0.8), (cx + r, cy + r * 0.8)], fill=fg)
    elif name == "ring":
        d.ellipse((cx - r, cy - r, cx + r, cy + r), outline=fg, width=max(3, int(r / 3.5)))
    elif name in ("hstripes", "vstripes"):
        period = rng.randint(8, 14)
        for k in range(-period, size + period, period):
            o = k + rng.randint(0, 2)
            box = (0, o, size, o + period // 2) if name == "hstripes" else (o, 0, o + period // 2, size)
            d.rectangle(box, fill=fg)
    elif name == "checker":
        period = rng.randint(10, 16)
        for i in range(0, size, period):
            for j in range(0, size, period):
                if (i // period + j // period) % 2 == 0:
                    d.rectangle((i, j, i + period - 1, j + period - 1), fill=fg)
    elif name == "cross":
        w = max(4, int(r / 2.5))
        d.rectangle((cx - r, cy - w / 2, cx + r, cy + w / 2), fill=fg)
        d.rectangle((cx - w / 2, cy - r, cx + w / 2, cy + r), fill=fg)
    noise = np.array(img, dtype=np.int16) + np.random.default_rng(rng.randint(0, 2 ** 31)).integers(
        -20, 21, (size, size, 3), dtype=np.int16)
    img = Image.fromarray(noise.clip(0, 255).astype(np.uint8))
    return img.filter(ImageFilter.GaussianBlur(rng.uniform(0, 0.8)))


def make_demo_data(root, train_per_class=60, val_per_class=20, size=72, classes=None, seed=0):
    """Write root/{train,val}/<class>/<i>.jpg once; same files for the same arguments."""
    root = Path(root)
    classes = classes or len(DEMO_CLASSES)
    if (root / "DONE").exists():
        return root
    tmp = Path(str(root) + f".tmp{os.getpid()}")
    for split, count in (("train", train_per_class), ("val", val_per_class)):
        for label in range(classes):
            folder = tmp / split / DEMO_CLASSES[label]
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                rng = random.Random(f"{seed}-{split}-{label}-{i}")
                draw_demo_image(label, rng, size).save(folder / f"{i:04d}.jpg", quality=90)
    (tmp / "DONE").write_text("demo data of common.make_demo_data\n")
    root.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.rename(tmp, root)
    except OSError:  # another process made it first
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def demo_data_dir():
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return cache / "resnet-recipes" / "demo-v1"


# ==================================================================================================
# CLI: main(recipe) -- every recipe key is a flag (--lr 4e-3), plus the run options
# ==================================================================================================

def parse_value(key, text, default):
    """Parse a flag's text as JSON where it can ('4e-3', 'null', 'true', '[0.4, 0.9]'), keep
    it a string otherwise, and check it has the type of the recipe's value."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        value = text
    if value is None or default is None:
        return value
    if isinstance(default, bool):
        if isinstance(value, str) and value.lower() in ("true", "yes", "on", "false", "no", "off"):
            value = value.lower() in ("true", "yes", "on")
        ok = isinstance(value, bool)
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    else:
        ok = isinstance(value, type(default))
    if not ok:
        raise UserError(f"--{key.replace('_', '-')} {text!r}: expected {type(default).__name__}"
                        f" like {json.dumps(default)}")
    return value


def resolve(recipe):
    """Fill the values derived from others: eval resize from the crop ratio as timm, or the
    crop ratio from an explicit eval resize as tv."""
    recipe = dict(recipe)
    if recipe.get("eval_resize") is None:
        if not recipe.get("crop_pct"):
            raise UserError("set --eval-resize or --crop-pct")
        recipe["eval_resize"] = math.floor(recipe["eval_size"] / recipe["crop_pct"])
    elif recipe.get("crop_pct") is None:
        recipe["crop_pct"] = round(recipe["eval_size"] / recipe["eval_resize"], 4)
    clip = recipe.get("clip")
    if clip is not None and not (isinstance(clip, dict) and clip.get("mode") in ("agc", "norm")
                                 and isinstance(clip.get("value"), (int, float))):
        raise UserError(f"--clip {json.dumps(clip)}: expected null or "
                        '{"mode": "agc" or "norm", "value": number}')
    for key, choices in CHOICES.items():
        if key in recipe and recipe[key] not in choices:
            raise UserError(f"--{key.replace('_', '-')} {recipe[key]!r}: expected one of "
                            + ", ".join(map(repr, choices)))
    if recipe.get("remode", "pixel") not in ("pixel", "tv"):
        raise UserError(f"--remode {recipe['remode']!r}: expected \"pixel\" (timm's erasing with "
                        "normal noise) or \"tv\" (tv's RandomErasing, value 0)")
    if recipe.get("auto_augment") and recipe["auto_augment"] != "ta_wide":
        parse_rand_augment(recipe["auto_augment"])  # a typo fails now, not after data loading
    return recipe


def run_parser():
    p = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    p.add_argument("--data", help="folder with train/ and val/ ImageFolders")
    p.add_argument("--output", help="run folder (default runs/<recipe>-<model>-<time>)")
    p.add_argument("--device", default="auto", help="cuda, cuda:1, cpu (default: cuda if any)")
    p.add_argument("--workers", type=int, default=None, help="data loader workers per process")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--demo", action="store_true", help="train on generated demo data")
    p.add_argument("--print-recipe", action="store_true", help="print the resolved recipe")
    p.add_argument("--resume", help="'auto': continue the --output folder's run where it "
                   "stopped, or start it if it has no checkpoint yet; or a checkpoint path")
    p.add_argument("--tensorboard", metavar="DIR", help="also write metrics.jsonl's numbers "
                   "as TensorBoard scalars to DIR (needs the tensorboard package)")
    p.add_argument("--bad-images", choices=("skip", "error"), default="skip",
                   help="unreadable training images: skip them (each reported once, counted "
                   "per epoch in metrics.jsonl) or stop with an error")
    p.add_argument("--save-every-minutes", type=float, default=None, metavar="M",
                   help="also checkpoint inside an epoch every M minutes (preemptible jobs)")
    p.add_argument("--device-batch", type=int, help="images per device per step; the rest of "
                   "the global batch comes from gradient accumulation")
    p.add_argument("--accum-steps", type=int, help="gradient accumulation steps")
    p.add_argument("--eval-batch", type=int, help="images per device per eval step")
    p.add_argument("--amp-dtype", choices=("auto", "bf16", "fp16", "off"), default="auto",
                   help="auto: on CUDA bf16 where the GPU has bf16 units (compute capability "
                   ">= 8.0), else fp16 with a grad scaler; float32 on a CPU. bf16 / fp16 are "
                   "honoured on a CPU too")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--fast-decode", action="store_true", help="decode training JPEGs at 1/2, "
                   "1/4 or 1/8 scale where the crop stays at least the train size (faster; "
                   "pixels differ slightly, see README Speed)")
    p.add_argument("--decode", choices=("pillow", "device"), default="pillow",
                   help="where training JPEGs are decoded: pillow, in the loader workers; "
                   "device, where the model trains (nvJPEG on a GPU), the workers only read "
                   "the files and draw the crops, flips and ops (implies --device-aug; "
                   "pixels differ slightly, see README Speed)")
    p.add_argument("--device-aug", action="store_true", help="apply RandAugment / "
                   "TrivialAugment to the batch on the device instead of in the workers (same "
                   "draws, same pixels; frees the CPU, see README Speed)")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="channels_last memory format (default: on CUDA only)")
    p.add_argument("--log-interval", type=int, default=20, help="steps between loss reads")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("-h", "--help", action="store_true")
    return p


def parse_args(recipe, argv, demo=None, variants=None, by_model=None):
    """(run options, resolved recipe). `variants` maps --variant names to recipes (C1 / C2);
    `by_model` maps model names to the values that come with them (ResNet-RS Table 8), applied
    before the command line so that an explicit flag still wins."""
    parser = run_parser()
    recipe = full_recipe(recipe)
    variants = {name: full_recipe(v) for name, v in (variants or {}).items()}
    if variants:
        parser.add_argument("--variant", choices=list(variants),
                            help=f"recipe variant (default {recipe['recipe']})")
    args, rest = parser.parse_known_args(argv)
    if variants and args.variant:
        recipe = variants[args.variant]
    as_written = resolve(recipe)
    overrides = {}
    keys = {k.replace("_", "-"): k for k in recipe}
    if args.help:
        parser.print_help()
        print("\nrecipe keys (override any with --key value):\n  " +
              "\n  ".join(f"--{k.replace('_', '-')} {json.dumps(v)}" for k, v in recipe.items()))
        sys.exit(0)
    i = 0
    while i < len(rest):
        flag = rest[i]
        name, _, inline = flag[2:].partition("=") if flag.startswith("--") else ("", "", "")
        key = keys.get(name.replace("_", "-"))
        if key is None:
            known = list(keys) + [a.option_strings[-1][2:] for a in parser._actions]
            close = difflib.get_close_matches(name.replace("_", "-"), known, n=1)
            hint = f"; did you mean --{close[0]}?" if close else ""
            raise UserError(f"unknown recipe key or option {flag!r}{hint} (--help lists them)")
        if inline == "" and "=" not in flag:
            if i + 1 >= len(rest):
                raise UserError(f"{flag} needs a value")
            inline, i = rest[i + 1], i + 1
        overrides[key] = parse_value(key, inline, recipe[key])
        i += 1
    if args.demo and demo:
        recipe = dict(recipe, **demo)
    model = overrides.get("model", recipe["model"])
    if by_model and model in by_model:
        recipe = dict(recipe, **by_model[model])
    args.lr_note = None
    if "batch_size" in overrides and "lr" not in overrides:
        # the recipe's lr is for its batch: another --batch-size alone scales it linearly
        recipe, args.lr_note = linear_lr(recipe, overrides["batch_size"], "--batch-size")
    recipe = resolve(dict(recipe, **overrides))
    # what differs from the script (--demo, a Table 8 row, the command line), for the start line
    args.changed = [(k, as_written[k], v) for k, v in recipe.items() if v != as_written[k]]
    return args, recipe


def main(recipe, demo=None, argv=None, variants=None, by_model=None):
    """Entry point of every train_*.py: parse, resolve, print, train."""
    try:
        if tuple(int(v) for v in re.findall(r"\d+", torch.__version__)[:2]) < MIN_TORCH:
            raise UserError(f"torch {torch.__version__} is older than "
                            f"{'.'.join(map(str, MIN_TORCH))}: pip install -U torch torchvision")
        args, recipe = parse_args(recipe, sys.argv[1:] if argv is None else argv, demo,
                                  variants, by_model)
        if args.print_recipe:
            print(json.dumps(recipe, indent=1))
            return
        if args.demo and not args.data:
            args.data = str(make_demo_data(demo_data_dir()))
            print(f"demo data in {args.data}")
        if not args.data:
            raise UserError("--data is required (a folder with train/ and val/), or --demo")
        args.workers_default = args.workers is None
        if args.workers is None:
            args.workers = default_workers()
        if args.output is None:
            args.output = (f"runs/{recipe['recipe']}-{recipe['model']}-"
                           f"{time.strftime('%Y%m%d-%H%M%S')}")
        if int(os.environ.get("RANK", 0)) == 0:
            changes = ", ".join(f"{k} {json.dumps(new)} (script: {json.dumps(old)})"
                                for k, old, new in args.changed)
            print(f"recipe {recipe['recipe']} ({Path(sys.argv[0]).name}) "
                  + (f"with {changes}" if changes else "as written")
                  + f"; every key in {Path(args.output) / 'recipe.json'}")
            if args.lr_note:
                print(args.lr_note)
        return train(recipe, args)
    except Stopped as e:
        if dist.is_initialized():  # every rank stops here at the same step: a clean teardown
            dist.destroy_process_group()
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"stopped by a signal at {e}, after saving {Path(args.output) / 'last.pth'}; "
                  f"continue with the same command and --resume auto", file=sys.stderr)
        sys.exit(EXIT_STOPPED)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except Exception as e:  # errors raised inside loader workers come back wrapped
        lines = [line for line in str(e).splitlines() if line.strip()]
        if lines and lines[-1].startswith("UserError: "):
            print(f"error: {lines[-1][len('UserError: '):]}", file=sys.stderr)
            sys.exit(2)
        # printed and ended here, not re-raised: Python would keep an uncaught exception, and
        # through it the run's persistent loaders, alive past exit, where multiprocessing sends
        # their workers SIGTERM, which they ignore (worker_init), and waits for them forever
        traceback.print_exc()
        sys.exit(1)


# ==================================================================================================
# The README's recipe table, generated from the scripts: python -m common recipes
# ==================================================================================================

RECIPE_SCRIPTS = ("train_a1.py", "train_a2.py", "train_a3.py", "train_b.py", "train_c.py",
                  "train_d.py", "train_tv.py", "train_rs.py")
OPT_NAMES = {"lamb": "LAMB", "rmsproptf": "RMSpropTF", "sgd": "SGD", "adamp": "AdamP"}


def script_recipes(root=None):
    """[(script, recipe)] for every recipe literal of every script (C1 and C2 both), resolved."""
    root = Path(root or Path(__file__).resolve().parent)
    out = []
    for script in RECIPE_SCRIPTS:
        spec = importlib.util.spec_from_file_location(script[:-3], root / script)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        for value in vars(module).values():
            if isinstance(value, dict) and "recipe" in value and "paper_top1" in value:
                out.append((script, resolve(full_recipe(value))))
    return sorted(out, key=lambda sr: sr[1]["recipe"])


def ingredients(r):
    """The recipe's distinctive ingredients, in a few words."""
    out = [f"{r['train_size']} px train / {r['eval_size']} test", r["loss"].upper()]
    if r["label_smoothing"]:
        out[-1] += f" + smoothing {r['label_smoothing']:g}"
    if r["sched"] == "step":
        out.append(f"step decay {r['decay_rate']:g} / {r['decay_epochs']:g} epoch")
    if r["lr_noise"]:
        out.append(f"LR noise {r['lr_noise'][0]:g}-{r['lr_noise'][1]:g}")
    if r["nesterov"] and r["opt"] == "sgd":
        out.append("Nesterov")
    if r["clip"]:
        out.append(f"{r['clip']['mode'].upper()} {r['clip']['value']:g}")
    if r["auto_augment"] == "ta_wide":
        out.append("TrivialAugmentWide")
    elif r["auto_augment"]:
        cfg = parse_rand_augment(r["auto_augment"])
        std = f" mstd {cfg['mstd']:g}" if cfg["mstd"] else ""
        out.append(f"RandAugment m{cfg['m']:g} n{cfg['n']}{std}")
    out += [f"{name} {r[key]:g}" for name, key in (("Mixup", "mixup"), ("CutMix", "cutmix"))
            if r[key]]
    if r["reprob"]:
        out.append(f"erasing {r['reprob']:g}" + (f" x{r['recount']}" if r["recount"] > 1 else ""))
    if r["repeated_aug"]:
        out.append(f"repeated aug x{r['repeated_aug']}")
    if r["drop_path"]:
        out.append(f"drop path {r['drop_path']:g}")
    if r["dropout"]:
        out.append(f"dropout {r['dropout']:g}")
    if r["ema_decay"]:
        out.append(f"EMA {r['ema_decay']:g}")
    return ", ".join(out)


def recipe_table(root=None):
    rows = ["| script | recipe | model | optimizer | epochs | batch | lr | key ingredients | "
            "published top-1 |", "|---|---|---|---|---|---|---|---|---|"]
    recipes = script_recipes(root)
    scripts = [script for script, _ in recipes]
    for script, r in recipes:
        # a script holding several recipes picks one with --variant (train_c.py: c1, c2)
        variant = f" --variant {r['recipe']}" if scripts.count(script) > 1 else ""
        rows.append(f"| `{script}{variant}` | {r['recipe']} | {r['model']} | "
                    f"{OPT_NAMES.get(r['opt'], r['opt'])} | {r['epochs']} | {r['batch_size']} | "
                    f"{r['lr']:g} | {ingredients(r)} | {r['paper_top1']} "
                    f"({r['top1_source']}) |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    if sys.argv[1:] == ["recipes"]:
        print(recipe_table(), end="")
    else:
        sys.exit("usage: python -m common recipes   (prints README's recipe table)")
