"""The engine shared by every recipe script: model, data, augmentation, loss, optimizer,
schedule, training loop, evaluation, checkpoints and the command line.

Sections follow the data: model -> data -> augment -> sampler -> loss -> optim -> schedule
-> engine -> CLI. Each ingredient says where its behaviour comes from: "timm" is
pytorch-image-models (the code the ResNet strikes back numbers were produced with), "tv" is
torchvision's references/classification, "RSB" is the ResNet strikes back paper.
"""
import argparse
import contextlib
import difflib
import json
import math
import os
import random
import re
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter, ImageOps

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class UserError(Exception):
    """A problem with the user's input: printed as one line, no traceback."""


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


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes, planes, stride=1, downsample=None, drop_path_rate=0.0):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.drop_path_rate = drop_path_rate

    def zero_init_last(self):
        nn.init.zeros_(self.bn2.weight)

    def forward(self, x):
        shortcut = x if self.downsample is None else self.downsample(x)
        x = F.relu(self.bn1(self.conv1(x)), inplace=True)
        x = self.bn2(self.conv2(x))
        x = drop_path(x, self.drop_path_rate, self.training)
        return F.relu(x + shortcut, inplace=True)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes, planes, stride=1, downsample=None, drop_path_rate=0.0):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        # stride on the 3x3 conv ("ResNet v1.5"), as torchvision and timm
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.downsample = downsample
        self.drop_path_rate = drop_path_rate

    def zero_init_last(self):
        nn.init.zeros_(self.bn3.weight)

    def forward(self, x):
        shortcut = x if self.downsample is None else self.downsample(x)
        x = F.relu(self.bn1(self.conv1(x)), inplace=True)
        x = F.relu(self.bn2(self.conv2(x)), inplace=True)
        x = self.bn3(self.conv3(x))
        x = drop_path(x, self.drop_path_rate, self.training)
        return F.relu(x + shortcut, inplace=True)


class ResNet(nn.Module):
    def __init__(self, block, layers, num_classes=1000, dropout=0.0, drop_path_rate=0.0):
        super().__init__()
        self.num_classes = num_classes
        self.dropout = dropout
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        inplanes, index, total = 64, 0, sum(layers)
        for stage, (depth, planes) in enumerate(zip(layers, (64, 128, 256, 512))):
            blocks = []
            for b in range(depth):
                stride = 2 if stage > 0 and b == 0 else 1
                downsample = None
                if b == 0 and (stride != 1 or inplanes != planes * block.expansion):
                    downsample = nn.Sequential(
                        nn.Conv2d(inplanes, planes * block.expansion, 1, stride, bias=False),
                        nn.BatchNorm2d(planes * block.expansion))
                # timm: block i of N drops with rate drop_path * i / (N - 1)
                rate = drop_path_rate * index / max(total - 1, 1)
                blocks.append(block(inplanes, planes, stride, downsample, rate))
                inplanes, index = planes * block.expansion, index + 1
            self.add_module(f"layer{stage + 1}", nn.Sequential(*blocks))
        self.fc = nn.Linear(512 * block.expansion, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        for m in self.modules():
            if hasattr(m, "zero_init_last"):  # RSB / timm: zero gamma of the last BN of a block
                m.zero_init_last()

    def forward(self, x):
        x = self.maxpool(F.relu(self.bn1(self.conv1(x)), inplace=True))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        x = F.dropout(x, self.dropout, self.training)  # timm: dropout before the classifier
        return self.fc(x)


MODELS = {
    "resnet18": (BasicBlock, (2, 2, 2, 2)),
    "resnet34": (BasicBlock, (3, 4, 6, 3)),
    "resnet50": (Bottleneck, (3, 4, 6, 3)),
    "resnet101": (Bottleneck, (3, 4, 23, 3)),
    "resnet152": (Bottleneck, (3, 8, 36, 3)),
    "resnet200": (Bottleneck, (3, 24, 36, 3)),
}


def create_model(name, num_classes=1000, dropout=0.0, drop_path=0.0):
    if name not in MODELS:
        raise UserError(f"unknown model {name!r}; known: {', '.join(MODELS)}")
    block, layers = MODELS[name]
    return ResNet(block, layers, num_classes, dropout, drop_path)


def model_name_from_state_dict(sd):
    """Which of MODELS a plain ResNet state dict (ours, torchvision's, timm's) belongs to."""
    bottleneck = "layer1.0.conv3.weight" in sd
    depths = tuple(len({k.split(".")[1] for k in sd if k.startswith(f"layer{i}.")})
                   for i in range(1, 5))
    for name, (block, layers) in MODELS.items():
        if (block is Bottleneck) == bottleneck and tuple(layers) == depths:
            return name
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


class ImageFolder(torch.utils.data.Dataset):
    """With skip_bad=True an unreadable image is reported once and replaced by the next one,
    so one corrupt file does not end a 600-epoch run; evaluation uses skip_bad=False."""

    def __init__(self, root, transform, skip_bad=False):
        self.samples, self.classes = find_images(root)
        self.root, self.transform, self.skip_bad = str(root), transform, skip_bad

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        for attempt in range(len(self.samples)):
            path, target = self.samples[(index + attempt) % len(self.samples)]
            try:
                with Image.open(path) as img:
                    img = img.convert("RGB")
                break
            except (OSError, ValueError, SyntaxError) as e:
                if not self.skip_bad:
                    raise UserError(f"cannot read image {path}: {e}") from None
                print(f"warning: skipping unreadable image {path}: {e}", file=sys.stderr)
        return self.transform(img), target


def to_uint8(img):
    """HWC uint8 array of a PIL image; collate() turns a list of them into an NCHW batch."""
    return np.asarray(img, dtype=np.uint8)


def collate(batch):
    """uint8 NCHW batch (channels_last memory, free to make) and int64 targets."""
    images = torch.from_numpy(np.stack([b[0] for b in batch])).permute(0, 3, 1, 2)
    return images, torch.tensor([b[1] for b in batch], dtype=torch.int64)


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


class TrainTransform:
    """timm's transforms_imagenet_train with the prefetcher: RandomResizedCrop, flip,
    RandAugment, then uint8 out; normalisation happens on the device (normalize())."""

    def __init__(self, size, interpolation="bicubic", auto_augment=None, hflip=0.5,
                 scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), mean=IMAGENET_MEAN):
        self.size, self.interpolation, self.hflip = size, interpolation, hflip
        self.scale, self.ratio = scale, ratio
        self.rand_augment = parse_rand_augment(auto_augment) if auto_augment else None
        # timm: RandAugment fills with the dataset mean and resamples with the train interpolation
        self.fill = tuple(min(255, round(255 * m)) for m in mean)

    def __call__(self, img):
        top, left, h, w = random_resized_crop_params(*img.size, self.scale, self.ratio)
        img = img.crop((left, top, left + w, top + h))
        img = img.resize((self.size, self.size), INTERPOLATION[self.interpolation])
        if random.random() < self.hflip:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        if self.rand_augment:
            img = rand_augment(img, self.rand_augment, self.fill,
                               INTERPOLATION[self.interpolation])
        return to_uint8(img)


class EvalTransform:
    """timm's transforms_imagenet_eval: resize the short side, center crop, uint8 out."""

    def __init__(self, size, resize, interpolation="bicubic"):
        self.size, self.resize, self.interpolation = size, resize, interpolation

    def __call__(self, img):
        return to_uint8(center_crop(resize_short(img, self.resize, self.interpolation), self.size))


def normalize(images, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """uint8 NCHW -> float32, (x - 255 mean) / (255 std), as timm's PrefetchLoader, on the
    batch's device: the CPU workers never touch floats."""
    m = torch.tensor([255 * v for v in mean], device=images.device).view(1, 3, 1, 1)
    s = torch.tensor([255 * v for v in std], device=images.device).view(1, 3, 1, 1)
    return images.float().sub_(m).div_(s)


# ==================================================================================================
# Augment: RandAugment (timm's variant), Mixup + CutMix
# ==================================================================================================

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


def augment_op(img, name, magnitude, fill=(128, 128, 128), resample=Image.BICUBIC):
    """One RandAugment op at `magnitude` in [0, 10], with timm's magnitude-to-argument maps."""
    level = magnitude / 10.0
    affine = dict(resample=resample, fillcolor=fill)
    if name == "AutoContrast":
        return ImageOps.autocontrast(img)
    if name == "Equalize":
        return ImageOps.equalize(img)
    if name == "Invert":
        return ImageOps.invert(img)
    if name == "Rotate":
        return img.rotate(_signed(level * 30.0), **affine)
    if name in ("Posterize", "PosterizeIncreasing"):
        bits = int(level * 4) if name == "Posterize" else 4 - int(level * 4)
        if bits <= 0:  # Pillow >= 13 refuses 0 bits; older Pillow (and so timm) gave black
            return img.point(lambda _: 0)
        return img if bits >= 8 else ImageOps.posterize(img, bits)
    if name in ("Solarize", "SolarizeIncreasing"):
        thresh = min(256, int(level * 256))
        return ImageOps.solarize(img, thresh if name == "Solarize" else 256 - thresh)
    if name == "SolarizeAdd":
        add = min(128, int(level * 110))
        return img.point([min(255, i + add) if i < 128 else i for i in range(256)] * 3)
    if name in ENHANCE:
        return ENHANCE[name](img).enhance(level * 1.8 + 0.1)
    if name.endswith("Increasing"):
        factor = max(0.1, 1.0 + _signed(level * 0.9))
        return ENHANCE[name[:-len("Increasing")]](img).enhance(factor)
    if name in ("ShearX", "ShearY"):
        s = _signed(level * 0.3)
        matrix = (1, s, 0, 0, 1, 0) if name == "ShearX" else (1, 0, 0, s, 1, 0)
        return img.transform(img.size, Image.AFFINE, matrix, **affine)
    if name in ("TranslateXRel", "TranslateYRel"):
        pct = _signed(level * 0.45)
        matrix = ((1, 0, pct * img.size[0], 0, 1, 0) if name == "TranslateXRel"
                  else (1, 0, 0, 0, 1, pct * img.size[1]))
        return img.transform(img.size, Image.AFFINE, matrix, **affine)
    raise ValueError(f"unknown RandAugment op {name}")


def rand_augment(img, cfg, fill, resample):
    """n ops drawn uniformly with replacement; each applied with probability p at a magnitude
    drawn from N(m, mstd) clamped to [0, mmax] (timm's RandAugment and AugmentOp)."""
    for name in random.choices(cfg["ops"], k=cfg["n"]):
        if cfg["p"] < 1.0 and random.random() > cfg["p"]:
            continue
        m = cfg["m"]
        if cfg["mstd"] == math.inf:
            m = random.uniform(0, m)
        elif cfg["mstd"] > 0:
            m = random.gauss(m, cfg["mstd"])
        img = augment_op(img, name, max(0.0, min(m, cfg["mmax"] or 10.0)), fill, resample)
    return img


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


def mix_batch(x, target, num_classes, lam, box=None, smoothing=0.0):
    """Mix sample i with sample N-1-i in place (the batch flipped), soft targets to match.
    An odd batch is fine: its middle sample is mixed with itself."""
    if box is not None:
        yl, yh, xl, xh = box
        x[:, :, yl:yh, xl:xh] = x.flip(0)[:, :, yl:yh, xl:xh]
    elif lam != 1.0:
        flipped = x.flip(0).mul_(1.0 - lam)
        x.mul_(lam).add_(flipped)
    y = smooth_one_hot(target, num_classes, smoothing)
    return x, y * lam + y.flip(0) * (1.0 - lam)


def mixup_cutmix(x, target, num_classes, mixup, cutmix, smoothing, rng):
    lam, use_cutmix = mix_params(rng, mixup, cutmix)
    box = None
    if use_cutmix:
        h, w = x.shape[-2:]
        box, lam = cutmix_box(h, w, lam, int(rng.integers(0, h)), int(rng.integers(0, w)))
    return mix_batch(x, target, num_classes, lam, box, smoothing)


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
# Optim: LAMB (You et al. 2019) exactly as timm's, multi-tensor
# ==================================================================================================

def param_groups(model, weight_decay):
    """timm: no weight decay on biases and norm weights (ndim <= 1)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
    return [dict(params=no_decay, weight_decay=0.0), dict(params=decay, weight_decay=weight_decay)]


class Lamb(torch.optim.Optimizer):
    """timm.optim.Lamb: Adam moments with bias correction, the whole gradient first clipped to
    global norm `max_grad_norm`, then a per-tensor trust ratio ||w|| / ||update|| for tensors
    with weight decay (1 where either norm is 0)."""

    def __init__(self, params, lr, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01,
                 max_grad_norm=1.0):
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps,
                                      weight_decay=weight_decay, max_grad_norm=max_grad_norm))

    @torch.no_grad()
    def step(self, closure=None):
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        if not grads:
            return
        clip = None
        if self.defaults["max_grad_norm"] is not None:
            norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
            clip = (norm / self.defaults["max_grad_norm"]).clamp_(min=1.0)
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            group["step"] = group.get("step", 0) + 1
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
            v = [self.state[p]["exp_avg_sq"] for p in params]
            torch._foreach_mul_(m, beta1)
            torch._foreach_add_(m, g, alpha=1 - beta1)
            torch._foreach_mul_(v, beta2)
            torch._foreach_addcmul_(v, g, g, value=1 - beta2)
            denom = torch._foreach_sqrt(v)
            torch._foreach_div_(denom, math.sqrt(bc2))
            torch._foreach_add_(denom, group["eps"])
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


def create_optimizer(model, recipe):
    if recipe["opt"] == "lamb":
        return Lamb(param_groups(model, recipe["weight_decay"]), lr=recipe["lr"],
                    betas=recipe["opt_betas"], eps=recipe["opt_eps"])
    raise UserError(f"optimizer {recipe['opt']!r} is not implemented yet (have: lamb)")


# ==================================================================================================
# Schedule: linear warmup from warmup_lr, then cosine to min_lr (timm CosineLRScheduler)
# ==================================================================================================

def lr_at(t, recipe):
    """lr at epoch t (a float when stepping per update). timm counts the cosine from epoch 0,
    warmup included (warmup_prefix False), and steps it once per epoch by default."""
    lr, warmup = recipe["lr"], recipe["warmup_epochs"]
    if t < warmup:
        return recipe["warmup_lr"] + t * (lr - recipe["warmup_lr"]) / warmup
    if recipe["sched"] == "cosine":
        if t >= recipe["epochs"]:
            return recipe["min_lr"]
        return recipe["min_lr"] + 0.5 * (lr - recipe["min_lr"]) * (
            1 + math.cos(math.pi * t / recipe["epochs"]))
    raise UserError(f"schedule {recipe['sched']!r} is not implemented yet (have: cosine)")


# ==================================================================================================
# Engine: distributed setup, loaders, train step, evaluation, checkpoints
# ==================================================================================================

def setup_device(device_arg):
    """(device, rank, world): torchrun's env:// when WORLD_SIZE is set, else one process."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank, local_rank = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    if device_arg in (None, "", "auto"):
        device_arg = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device_arg)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError("--device cuda asked for, but torch sees no CUDA GPU")
        if device.index is None:
            device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method="env://")
    return device, rank, world


def batch_plan(batch_size, world, device_batch=None, accum_steps=None):
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
    # torch seeds `random` and torch per worker; numpy too, for any numpy-based transform
    np.random.seed(torch.initial_seed() % 2 ** 32)


def make_loader(dataset, batch, workers, device, sampler, drop_last):
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch, sampler=sampler, num_workers=workers, collate_fn=collate,
        pin_memory=device.type == "cuda", drop_last=drop_last, worker_init_fn=worker_init,
        persistent_workers=workers > 0, prefetch_factor=4 if workers > 0 else None)


def unwrap(model):
    model = getattr(model, "_orig_mod", model)  # torch.compile
    return getattr(model, "module", model)  # DDP


@torch.no_grad()
def evaluate(model, loader, device, amp_dtype=None, world=1):
    """top-1 / top-5 / CE loss; each rank sees a disjoint shard, sums are all-reduced, so the
    numbers count every image exactly once."""
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss, top1, top5, count
    for images, target in loader:
        images = normalize(images.to(device, non_blocking=True))
        target = target.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = model(images)
        logits = logits.float()
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        sums[0] += F.cross_entropy(logits, target, reduction="sum")
        sums[1] += (top[:, 0] == target).sum()
        sums[2] += (top == target[:, None]).any(dim=1).sum()
        sums[3] += target.numel()
    if world > 1:
        dist.all_reduce(sums)
    n = max(sums[3].item(), 1)
    return dict(top1=100 * sums[1].item() / n, top5=100 * sums[2].item() / n,
                loss=sums[0].item() / n, images=int(sums[3].item()))


def average_bn_stats(model, world):
    """timm train.py --dist-bn reduce (its default): BN running stats averaged over ranks
    before each evaluation and checkpoint."""
    for name, buf in model.named_buffers():
        if name.endswith(("running_mean", "running_var")):
            dist.all_reduce(buf)
            buf.div_(world)


def save_checkpoint(path, state):
    """Written to a temporary file, then renamed: a crash mid-save never loses the last one."""
    tmp = Path(str(path) + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


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
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"cannot read checkpoint {path}: {str(e).splitlines()[0]}") from None


def state_dict_of(obj):
    """Model weights from our checkpoint, timm's train checkpoint or a plain state dict."""
    if isinstance(obj, dict):
        for key in ("model", "state_dict", "model_state_dict"):
            if isinstance(obj.get(key), dict):
                return obj[key]
        if obj and all(torch.is_tensor(v) for v in obj.values()):
            return obj
    raise UserError("checkpoint holds no model state dict")


def amp_dtype_for(device, recipe, amp_dtype):
    if not recipe["amp"] or device.type != "cuda" or amp_dtype == "off":
        return None
    if amp_dtype == "fp16" or not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


def train(recipe, args):
    if not Path(args.data).is_dir():
        raise UserError(f"data folder {args.data} does not exist")
    device, rank, world = setup_device(args.device)
    log = print if rank == 0 else (lambda *a, **k: None)
    seed = args.seed + rank
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    mix_rng = np.random.default_rng(seed)

    per_device, accum, effective = batch_plan(recipe["batch_size"], world, args.device_batch,
                                              args.accum_steps)
    if effective != recipe["batch_size"]:
        scaled = recipe["lr"] * effective / recipe["batch_size"]
        log(f"global batch {effective} ({world} x {per_device} x {accum} accumulation) differs "
            f"from the recipe's {recipe['batch_size']}: lr {recipe['lr']:g} -> {scaled:g} "
            "(linear scaling)")
        recipe = dict(recipe, lr=scaled, batch_size=effective)
    log(f"{world} process(es) on {device}, {per_device} images per device x {accum} "
        f"accumulation step(s) = global batch {effective}")

    root = Path(args.data)
    train_set = ImageFolder(root / "train", TrainTransform(
        recipe["train_size"], recipe["interpolation"], recipe["auto_augment"]), skip_bad=True)
    val_set = ImageFolder(root / "val", EvalTransform(
        recipe["eval_size"], recipe["eval_resize"], recipe["interpolation"]))
    if val_set.classes != train_set.classes:
        raise UserError(f"{root}/val has other class folders than {root}/train")
    num_classes = len(train_set.classes)
    train_sampler = torch.utils.data.DistributedSampler(
        train_set, num_replicas=world, rank=rank, shuffle=True, seed=args.seed)
    train_loader = make_loader(train_set, per_device, args.workers, device, train_sampler, True)
    val_loader = make_loader(val_set, args.eval_batch or per_device, args.workers, device,
                             list(range(rank, len(val_set), world)), False)
    steps = len(train_loader) // accum * accum
    if steps == 0:
        raise UserError(f"{root}/train has {len(train_set)} images, fewer than one step of "
                        f"{world} x {per_device} x {accum}: lower --batch-size")

    model = create_model(recipe["model"], num_classes, recipe["dropout"], recipe["drop_path"])
    model.to(device)
    channels_last = device.type == "cuda" and not args.no_channels_last
    if channels_last:
        model.to(memory_format=torch.channels_last)
    optimizer = create_optimizer(model, recipe)
    amp_dtype = amp_dtype_for(device, recipe, args.amp_dtype)
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None

    out = Path(args.output)
    start_epoch, best = 0, -1.0
    if args.resume:
        ckpt_path = out / "last.pth" if args.resume == "auto" else Path(args.resume)
        ckpt = load_checkpoint(ckpt_path)
        if ckpt.get("recipe", {}).get("model") not in (None, recipe["model"]):
            raise UserError(f"checkpoint {ckpt_path} is a {ckpt['recipe']['model']}, "
                            f"this run trains a {recipe['model']}")
        load_weights(model, state_dict_of(ckpt), f"checkpoint {ckpt_path}")
        if "optimizer" in ckpt:
            optimizer.load_state_dict(ckpt["optimizer"])
        if scaler is not None and ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        start_epoch, best = ckpt.get("epoch", -1) + 1, ckpt.get("best_top1", -1.0)
        log(f"resumed from {ckpt_path} at epoch {start_epoch}")
    elif (out / "last.pth").exists():
        raise UserError(f"{out} already holds a checkpoint (last.pth): pass --resume auto to "
                        "continue it, or choose another --output")
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "recipe.json").write_text(json.dumps(recipe, indent=1) + "\n")

    ddp_model = model
    if world > 1:
        ddp_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    if args.compile:
        ddp_model = torch.compile(ddp_model)

    if recipe["loss"] == "bce":
        def loss_fn(logits, y):
            return binary_cross_entropy(logits, y, recipe["label_smoothing"],
                                        recipe["bce_target_thresh"])
    else:
        def loss_fn(logits, y):
            return cross_entropy(logits, y, recipe["label_smoothing"])
    mixing = recipe["mixup"] > 0 or recipe["cutmix"] > 0

    for epoch in range(start_epoch, recipe["epochs"]):
        train_sampler.set_epoch(epoch)
        ddp_model.train()
        loss_sum = torch.zeros((), device=device)
        t0 = time.perf_counter()
        bar = None
        if rank == 0 and not args.quiet:
            from tqdm import tqdm
            bar = tqdm(total=steps, desc=f"epoch {epoch + 1}/{recipe['epochs']}",
                       leave=False, dynamic_ncols=True, mininterval=1.0)
        for step, (images, target) in zip(range(steps), train_loader):
            t = epoch + (step // accum * accum) / steps if recipe["sched_per_step"] else epoch
            lr = lr_at(t, recipe)
            for group in optimizer.param_groups:
                group["lr"] = lr
            images = normalize(images.to(device, non_blocking=True))
            if not channels_last:
                images = images.contiguous()
            target = target.to(device, non_blocking=True)
            if mixing:
                images, target = mixup_cutmix(images, target, num_classes, recipe["mixup"],
                                              recipe["cutmix"], recipe["label_smoothing"],
                                              mix_rng)
            last_micro = (step + 1) % accum == 0
            sync = ddp_model.no_sync() if world > 1 and not last_micro else contextlib.nullcontext()
            with sync:
                with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    logits = ddp_model(images)
                loss = loss_fn(logits.float(), target)
                (scaler.scale(loss / accum) if scaler else loss / accum).backward()
            if last_micro:
                if scaler:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            loss_sum += loss.detach()
            if bar is not None:
                bar.update()
                if (step + 1) % args.log_interval == 0 or step + 1 == steps:
                    seen = (step + 1) * per_device * world
                    bar.set_postfix(loss=f"{loss_sum.item() / (step + 1):.4f}", lr=f"{lr:.3g}",
                                    img_s=f"{seen / (time.perf_counter() - t0):.0f}")
            if (step + 1) % args.log_interval == 0 and not torch.isfinite(loss_sum):
                break
        if bar is not None:
            bar.close()
        if world > 1:
            dist.all_reduce(loss_sum)
        train_loss = loss_sum.item() / (steps * world)
        if not math.isfinite(train_loss):
            raise UserError(f"training loss became {train_loss} in epoch {epoch + 1} (lr {lr:g});"
                            f" {out / 'last.pth'} still holds the last good epoch: resume it with"
                            " --resume auto and a lower --lr")
        train_time = time.perf_counter() - t0
        if world > 1:
            average_bn_stats(model, world)
        # the plain model: ranks may hold different numbers of eval batches, and DDP's forward
        # could wait on a collective
        metrics = evaluate(model, val_loader, device, amp_dtype, world)
        is_best = metrics["top1"] > best
        best = max(best, metrics["top1"])
        row = dict(epoch=epoch + 1, lr=float(f"{lr:.6g}"), train_loss=round(train_loss, 5),
                   top1=round(metrics["top1"], 3), top5=round(metrics["top5"], 3),
                   val_loss=round(metrics["loss"], 5), best_top1=round(best, 3),
                   val_images=metrics["images"],
                   train_img_s=round(steps * per_device * world / train_time, 1),
                   epoch_s=round(time.perf_counter() - t0, 1))
        log(" ".join(f"{k} {v}" for k, v in row.items()), flush=True)
        if rank == 0:
            with open(out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")
            state = dict(model=model.state_dict(), optimizer=optimizer.state_dict(),
                         scaler=scaler.state_dict() if scaler else None, epoch=epoch,
                         best_top1=best, metrics=row, recipe=recipe, classes=train_set.classes)
            save_checkpoint(out / "last.pth", state)
            if is_best:
                link_checkpoint(out / "last.pth", out / "best.pth")
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return best


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
    """Fill the values derived from others: eval resize from the crop ratio as timm."""
    recipe = dict(recipe)
    if recipe.get("eval_resize") is None:
        recipe["eval_resize"] = math.floor(recipe["eval_size"] / recipe["crop_pct"])
    if recipe.get("auto_augment"):
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
    p.add_argument("--resume", help="'auto' (the output's last.pth) or a checkpoint path")
    p.add_argument("--device-batch", type=int, help="images per device per step; the rest of "
                   "the global batch comes from gradient accumulation")
    p.add_argument("--accum-steps", type=int, help="gradient accumulation steps")
    p.add_argument("--eval-batch", type=int, help="images per device per eval step")
    p.add_argument("--amp-dtype", choices=("bf16", "fp16", "off"), default="bf16",
                   help="bf16 where the GPU has it, else fp16 with a grad scaler")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--no-channels-last", action="store_true")
    p.add_argument("--log-interval", type=int, default=20, help="steps between loss reads")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("-h", "--help", action="store_true")
    return p


def parse_args(recipe, argv, demo=None):
    parser = run_parser()
    args, rest = parser.parse_known_args(argv)
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
    return args, resolve(dict(recipe, **overrides))


def main(recipe, demo=None, argv=None):
    """Entry point of every train_*.py: parse, resolve, print, train."""
    try:
        args, recipe = parse_args(recipe, sys.argv[1:] if argv is None else argv, demo)
        if args.print_recipe:
            print(json.dumps(recipe, indent=1))
            return
        if args.demo and not args.data:
            args.data = str(make_demo_data(demo_data_dir()))
            print(f"demo data in {args.data}")
        if not args.data:
            raise UserError("--data is required (a folder with train/ and val/), or --demo")
        if args.workers is None:
            local = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
            args.workers = max(1, min(8, (os.cpu_count() or 2) // local))
        if args.output is None:
            args.output = (f"runs/{recipe['recipe']}-{recipe['model']}-"
                           f"{time.strftime('%Y%m%d-%H%M%S')}")
        if int(os.environ.get("RANK", 0)) == 0:
            print(json.dumps(recipe))
        return train(recipe, args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except Exception as e:  # errors raised inside loader workers come back wrapped
        lines = [line for line in str(e).splitlines() if line.strip()]
        if lines and lines[-1].startswith("UserError: "):
            print(f"error: {lines[-1][len('UserError: '):]}", file=sys.stderr)
            sys.exit(2)
        raise
