"""TorchVision's ResNet-50 recipe (Vryniotis 2021, "How to Train State-Of-The-Art Models Using
TorchVision's Latest Primitives"; the weights ResNet50_Weights.IMAGENET1K_V2).

Published: ResNet-50, 80.858% top-1 on ImageNet-1k val with the EMA weights (the blog's table).

    torchrun --nproc_per_node=8 train_tv.py --data /imagenet
    python train_tv.py --demo          # a few minutes on a CPU, generated data

Any key can be overridden: `--lr 0.25 --epochs 12`. The recipe below lists what it sets; every
other key is at its default (common.DEFAULTS, shown by --print-recipe). "blog" = the post above,
"tv" = torchvision's references/classification (train.py, presets.py, utils.py), the code of the
number.
"""
from common import main

RECIPE = dict(
    recipe="tv",
    model="resnet50",
    epochs=600,                           # blog
    warmup_epochs=5,                      # blog: --lr-warmup-epochs 5
    batch_size=1024,                      # blog: 8 GPUs x 128; global, lr is for this batch
    train_size=176,                       # blog: --train-crop-size 176 (FixRes effect)
    eval_size=224,                        # blog: --val-crop-size 224
    eval_resize=232,                      # blog: --val-resize-size 232
    interpolation="bilinear",             # tv default (the recipe keeps it)
    opt="sgd",                            # blog
    lr=0.5,                               # blog
    weight_decay=2e-5,                    # blog
    wd_groups="tv",                       # blog --norm-weight-decay 0: BN exempt, biases decayed
    momentum=0.9,                         # tv default
    nesterov=False,                       # tv: plain momentum (the blog found Nesterov no better)
    sched="cosine",                       # blog: --lr-scheduler cosineannealinglr
    warmup_factor=0.01,                   # tv --lr-warmup-decay 0.01 (LinearLR start_factor)
    warmup_prefix=True,                   # tv: CosineAnnealingLR(T_max=epochs - 5) after warmup
    loss="ce",                            # blog
    label_smoothing=0.1,                  # blog
    zero_init_last=False,                 # tv's resnet50 keeps zero_init_residual=False
    repeated_aug=4,                       # blog: --ra-sampler --ra-reps 4
    auto_augment="ta_wide",               # blog: TrivialAugmentWide
    mixup=0.2,                            # blog
    cutmix=1.0,                           # blog
    mixup_style="tv",                     # tv: partner = batch rolled by one, tv's CutMix box
    reprob=0.1,                           # blog: --random-erase 0.1
    remode="tv",                          # tv RandomErasing(value=0): the mean after Normalize
    ema_decay=0.99998,                    # blog: --model-ema-decay, before tv's adjustment
    ema_every=32,                         # blog: --model-ema-steps 32
    ema_style="tv",                       # tv: decay adjusted to batch and epochs, copies
                                          # during warmup
    amp=False,                            # blog's command has no --amp: fp32 (--amp true: faster)
    paper_top1=80.858,                    # blog, EMA weights
    top1_source="TorchVision blog",
)

# --demo: ResNet-18 on the generated 8-class shapes at 48 px (eval 50 -> 48 as 232 -> 224), lr
# scaled linearly to batch 32, EMA every step so that 30 short epochs move it
DEMO = dict(model="resnet18", epochs=30, warmup_epochs=1, batch_size=32, lr=0.5 * 32 / 1024,
            train_size=48, eval_size=48, eval_resize=50, ema_every=1)

if __name__ == "__main__":
    main(RECIPE, DEMO)
