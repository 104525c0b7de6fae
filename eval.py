"""Evaluate checkpoints on an ImageFolder: one JSON line per (checkpoint, test size) on stdout,
and a Markdown table of them on stderr.

    python eval.py --checkpoint runs/a3-resnet50-.../best.pth --data /imagenet/val
    python eval.py --checkpoint runs/a3-*/best.pth --data /imagenet --eval-size 160 192 224 256
    python eval.py --checkpoint best.pth --data /imagenet --real-labels real.json
    python eval.py --checkpoint best.pth --data imagenetv2-matched-frequency-format-val
    python eval.py --checkpoint resnet50_tv.pth --data /imagenet/val --eval-size 224 \
        --crop-pct 0.875 --interpolation bilinear > tv.jsonl

Loads our checkpoints (their recipe gives the eval size, crop ratio and interpolation; the EMA
weights where the run kept an EMA) and plain torchvision / timm ResNet state dicts (the
architecture is read off the keys). `--data` is a folder of class folders, or a folder holding
val/. Class folders named 0..999 are ImageNet-V2's layout: folder k holds class index k.
Each image is decoded once per test size, whatever the number of checkpoints. Runs on a CPU,
one GPU, or under torchrun (every image counted once).
"""
import argparse
import json
import os
import sys
from pathlib import Path

import torch

import common


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    p.add_argument("--checkpoint", required=True, nargs="+")
    p.add_argument("--data", required=True, help="class folders, or a folder holding val/")
    p.add_argument("--model", help="architecture; default: the checkpoint's")
    p.add_argument("--eval-size", type=int, nargs="+",
                   help="center crop side(s) (default: the recipe's, or 224)")
    p.add_argument("--crop-pct", type=float, help="resize = floor(eval_size / crop_pct) "
                   "(default: the recipe's ratio, or 0.875)")
    p.add_argument("--eval-resize", type=int, nargs="+",
                   help="short side before the crop, one per --eval-size")
    p.add_argument("--interpolation", choices=("bilinear", "bicubic"))
    p.add_argument("--real-labels", help="ImageNet-ReaL's real.json: label sets in sorted "
                   "val-file order; adds ReaL top-1")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--workers", type=int, default=common.default_workers())
    p.add_argument("--device", default="auto")
    p.add_argument("--amp-dtype", choices=("auto", "bf16", "fp16", "off"), default="off",
                   help="autocast dtype (default off: float32); auto as train: bf16 or fp16 "
                   "on CUDA by the GPU, float32 on a CPU")
    p.add_argument("--weights", choices=("auto", "ema", "model"), default="auto",
                   help="which weights of one of our checkpoints: auto = the EMA's where the "
                        "run kept an EMA (the recipes' published numbers are EMA numbers)")
    args = p.parse_args(argv)
    if args.eval_resize and len(args.eval_resize) != len(args.eval_size or [None]):
        p.error("--eval-resize needs one value per --eval-size")
    return args


def load_model(path, args):
    """(model, name, which weights, recipe, classes) of one checkpoint."""
    ckpt = common.load_checkpoint(path)
    ema = ckpt.get("ema") if isinstance(ckpt, dict) else None
    if args.weights == "ema" and not ema:
        raise common.UserError(f"checkpoint {path} holds no EMA weights")
    use_ema = bool(ema) and args.weights != "model"
    weights = ema["module"] if use_ema else common.state_dict_of(ckpt)
    recipe = ckpt.get("recipe", {}) if isinstance(ckpt, dict) else {}
    name = args.model or recipe.get("model") or common.model_name_from_state_dict(
        {k.removeprefix("module."): v for k, v in weights.items()})
    fc = weights.get("fc.weight", weights.get("module.fc.weight"))
    num_classes = fc.shape[0] if fc is not None else 1000
    model = common.create_model(name, num_classes, zero_init_last=False)
    common.load_weights(model, weights, f"checkpoint {path}")
    return model, name, "ema" if use_ema else "model", recipe, ckpt.get("classes")


def transforms_for(recipe, args):
    """[(size, resize, interpolation)] to test one checkpoint at: the given sizes, with the
    given resize or crop ratio, else the recipe's, else 224 / 0.875 (256 -> 224)."""
    def resize_for(size, crop_pct):  # as training derives it (common.resolve)
        return common.resolve(dict(eval_size=size, crop_pct=crop_pct))["eval_resize"]
    interpolation = args.interpolation or recipe.get("interpolation", "bilinear")
    if not args.eval_size:
        size = recipe.get("eval_size", 224)
        if args.eval_resize:
            resize = args.eval_resize[0]
        elif args.crop_pct:
            resize = resize_for(size, args.crop_pct)
        else:
            resize = recipe.get("eval_resize") or resize_for(size, 0.875)
        return [(size, resize, interpolation)]
    crop_pct = args.crop_pct or recipe.get("crop_pct") or 0.875
    resizes = args.eval_resize or [resize_for(size, crop_pct) for size in args.eval_size]
    return [(size, resize, interpolation) for size, resize in zip(args.eval_size, resizes)]


def number_classes(dataset):
    """Numbered class folders (ImageNet-V2: folder k holds class k) take their number as the
    target; named ones (ImageNet's wnids) keep their sorted position. True if numbered."""
    numeric = [c.isdigit() for c in dataset.classes]
    if any(numeric) and not all(numeric):
        raise common.UserError(f"{dataset.root} mixes numbered and named class folders")
    if all(numeric):
        index = [int(c) for c in dataset.classes]
        dataset.samples = [(p, index[t]) for p, t in dataset.samples]
    return all(numeric)


def check_classes(dataset, numbered, classes, num_classes):
    """The folder's classes must be the model's: numbered ones within its range, named ones
    the checkpoint's (when it lists them) in the same order."""
    if numbered:
        top = max(int(c) for c in dataset.classes)
        if top >= num_classes:
            raise common.UserError(f"{dataset.root} has class folder {top}, the model only "
                                   f"{num_classes} classes (0..{num_classes - 1})")
        return
    if len(dataset.classes) > num_classes:
        raise common.UserError(f"{dataset.root} has {len(dataset.classes)} classes, the model "
                               f"only {num_classes}")
    if classes and classes[:len(dataset.classes)] != dataset.classes:
        raise common.UserError(f"the class folders of {dataset.root} are not the ones the "
                               "checkpoint was trained on")


def real_labels(path, dataset):
    """ReaL's label sets, one per sample of `dataset` (real.json lists them in the order of the
    sorted val file names)."""
    labels = json.loads(Path(path).read_text())
    if len(labels) != len(dataset):
        raise common.UserError(f"{path} has {len(labels)} label sets, {dataset.root} "
                               f"{len(dataset)} images")
    names = sorted(range(len(dataset)), key=lambda i: os.path.basename(dataset.samples[i][0]))
    by_sample = [None] * len(dataset)
    for position, i in enumerate(names):
        by_sample[i] = labels[position]
    return by_sample


def run(args):
    device, rank, world = common.setup_device(args.device)
    data = Path(args.data)
    if (data / "val").is_dir():
        data = data / "val"
    loaded = [(path, *load_model(path, args)) for path in args.checkpoint]
    amp = common.amp_dtype_for(device, dict(amp=True), args.amp_dtype)
    # one pass over the data per transform, every checkpoint that uses it on each batch
    passes = {}
    for entry in loaded:
        for transform in transforms_for(entry[4], args):
            passes.setdefault(transform, []).append(entry)
    results = []
    for (size, resize, interpolation), entries in passes.items():
        dataset = common.ImageFolder(data, common.EvalTransform(size, resize, interpolation))
        numbered = number_classes(dataset)
        for path, model, name, weights, recipe, classes in entries:
            check_classes(dataset, numbered, classes, model.fc.out_features)
        real = real_labels(args.real_labels, dataset) if args.real_labels else None
        models = []
        for path, model, *_ in entries:
            model.to(device).eval()
            if device.type == "cuda":
                model.to(memory_format=torch.channels_last)
            models.append(model)
        indices = list(range(rank, len(dataset), world))
        loader = common.make_loader(dataset, args.batch_size, args.workers, device, indices,
                                    False)
        scores = common.evaluate(models, loader, device, amp, world,
                                 real and (indices, real))
        for (path, model, name, weights, *_), m in zip(entries, scores):
            result = dict(checkpoint=str(path), model=name, data=str(data), weights=weights,
                          eval_size=size, eval_resize=resize, interpolation=interpolation,
                          top1=round(m["top1"], 3), top5=round(m["top5"], 3),
                          loss=round(m["loss"], 5), images=m["images"])
            if real is not None:
                result.update(real_top1=round(m["real_top1"], 3), real_images=m["real_images"])
            results.append(result)
            if rank == 0:
                print(json.dumps(result), flush=True)
    if rank == 0:
        print(table(results), file=sys.stderr, end="")
    if world > 1:  # left to the interpreter's exit, gloo's teardown can abort rank 0 (seen in CI)
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return results[0] if len(results) == 1 else results


def table(results):
    real = any("real_top1" in r for r in results)
    lines = ["| checkpoint | weights | size | resize | top-1 | top-5 |" + (" ReaL |" if real
                                                                          else ""),
             "|---|---|---|---|---|---|" + ("---|" if real else "")]
    for r in results:
        lines.append(f"| {r['checkpoint']} | {r['weights']} | {r['eval_size']} | "
                     f"{r['eval_resize']} {r['interpolation']} | {r['top1']:.2f} | "
                     f"{r['top5']:.2f} |" + (f" {r['real_top1']:.2f} |" if real else ""))
    return "\n".join(lines) + "\n"


def main(argv=None):
    try:
        return run(parse_args(argv))
    except common.UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
