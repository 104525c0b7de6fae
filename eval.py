"""Evaluate a checkpoint on an ImageFolder: top-1 / top-5 as one JSON line.

    python eval.py --checkpoint runs/a3-resnet50-.../best.pth --data /imagenet/val
    python eval.py --checkpoint resnet50_tv.pth --data /imagenet/val --eval-size 224 \
        --crop-pct 0.875 --interpolation bilinear

Loads our checkpoints (their recipe gives the eval size, resize and interpolation) and plain
torchvision / timm ResNet state dicts (the architecture is read off the keys). `--data` is a
folder of class folders, or a folder holding val/. Runs under torchrun as well.
"""
import argparse
import json
import math
import sys
from pathlib import Path

import torch

import common


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data", required=True, help="class folders, or a folder holding val/")
    p.add_argument("--model", help="architecture; default: the checkpoint's")
    p.add_argument("--eval-size", type=int, help="center crop side (default: recipe's or 224)")
    p.add_argument("--crop-pct", type=float, help="resize = floor(eval_size / crop_pct)")
    p.add_argument("--eval-resize", type=int, help="short side before the crop")
    p.add_argument("--interpolation", choices=("bilinear", "bicubic"))
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--workers", type=int, default=common.default_workers())
    p.add_argument("--device", default="auto")
    p.add_argument("--amp-dtype", choices=("auto", "bf16", "fp16", "off"), default="off",
                   help="autocast dtype (default off: float32); auto as train: bf16 or fp16 "
                   "on CUDA by the GPU, float32 on a CPU")
    p.add_argument("--weights", choices=("auto", "ema", "model"), default="auto",
                   help="which weights of one of our checkpoints: auto = the EMA's where the "
                        "run kept an EMA (the recipes' published numbers are EMA numbers)")
    return p.parse_args(argv)


def run(args):
    ckpt = common.load_checkpoint(args.checkpoint)
    ema = ckpt.get("ema") if isinstance(ckpt, dict) else None
    if args.weights == "ema" and not ema:
        raise common.UserError(f"checkpoint {args.checkpoint} holds no EMA weights")
    use_ema = bool(ema) and args.weights != "model"
    weights = ema["module"] if use_ema else common.state_dict_of(ckpt)
    recipe = ckpt.get("recipe", {}) if isinstance(ckpt, dict) else {}
    name = args.model or recipe.get("model") or common.model_name_from_state_dict(
        {k.removeprefix("module."): v for k, v in weights.items()})
    fc = weights.get("fc.weight", weights.get("module.fc.weight"))
    num_classes = fc.shape[0] if fc is not None else 1000
    model = common.create_model(name, num_classes, zero_init_last=False)
    common.load_weights(model, weights, f"checkpoint {args.checkpoint}")

    size = args.eval_size or recipe.get("eval_size", 224)
    if args.eval_resize:
        resize = args.eval_resize
    elif args.crop_pct:
        resize = math.floor(size / args.crop_pct)
    elif recipe.get("eval_resize") and not args.eval_size:
        resize = recipe["eval_resize"]
    else:
        resize = math.floor(size / 0.875)  # the usual 256 -> 224
    interpolation = args.interpolation or recipe.get("interpolation", "bilinear")

    data = Path(args.data)
    if (data / "val").is_dir():
        data = data / "val"
    dataset = common.ImageFolder(data, common.EvalTransform(size, resize, interpolation))
    if len(dataset.classes) > num_classes:
        raise common.UserError(f"{data} has {len(dataset.classes)} classes, the model only "
                               f"{num_classes}")
    if "classes" in ckpt and ckpt["classes"] != dataset.classes[:len(ckpt["classes"])]:
        raise common.UserError(f"the class folders of {data} are not the ones the checkpoint "
                               "was trained on")

    device, rank, world = common.setup_device(args.device)
    model.to(device)
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    loader = common.make_loader(dataset, args.batch_size, args.workers, device,
                                list(range(rank, len(dataset), world)), False)
    amp = common.amp_dtype_for(device, dict(amp=True), args.amp_dtype)
    metrics = common.evaluate(model, loader, device, amp, world)
    result = dict(checkpoint=str(args.checkpoint), model=name, data=str(data),
                  weights="ema" if use_ema else "model",
                  eval_size=size, eval_resize=resize, interpolation=interpolation,
                  top1=round(metrics["top1"], 3), top5=round(metrics["top5"], 3),
                  loss=round(metrics["loss"], 5), images=metrics["images"])
    if rank == 0:
        print(json.dumps(result))
    return result


def main(argv=None):
    try:
        return run(parse_args(argv))
    except common.UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
