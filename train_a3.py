"""ResNet strikes back, procedure A3 (Wightman, Touvron, Jegou 2021; arXiv 2110.00476).

The cheapest of the three RSB recipes: 100 epochs at 160 px, tested at 224 px.
Published: ResNet-50, 78.1% top-1 on ImageNet-1k val (84.5 ReaL, 66.1 V2), RSB Table 1.

    torchrun --nproc_per_node=4 train_a3.py --data /imagenet
    python train_a3.py --demo          # a few minutes on a CPU, generated data

Any key can be overridden: `--lr 4e-3 --epochs 12`. The recipe below lists what it sets; every
other key is at its default (common.DEFAULTS, shown by --print-recipe). "RSB T2" = Table 2 of the
paper, "timm" = the reference code the published number came from.
"""
from common import main

RECIPE = dict(
    recipe="a3",
    model="resnet50",
    epochs=100,                           # RSB T2
    warmup_epochs=5,                      # RSB T2
    batch_size=2048,                      # RSB T2; global, lr is for this batch
    train_size=160,                       # RSB T2: train at 160 px ...
    eval_size=224,                        # RSB T2: ... test at 224 px
    crop_pct=0.95,                        # RSB T2 test crop ratio
    interpolation="bicubic",              # timm RSB runs: bicubic train and eval
    opt="lamb",                           # RSB T2
    lr=8e-3,                              # RSB T2
    weight_decay=0.02,                    # RSB T2
    opt_eps=1e-6,                         # timm Lamb default
    opt_betas=[0.9, 0.999],               # timm Lamb default
    sched="cosine",                       # RSB T2
    warmup_lr=1e-4,                       # timm train.py --warmup-lr
    min_lr=1e-6,                          # timm train.py --min-lr
    loss="bce",                           # RSB T2: BCE instead of CE
    label_smoothing=0.0,                  # RSB T2: no smoothing for A3
    bce_target_thresh=0.2,                # timm --bce-target-thresh 0.2: binarised targets
    dropout=0.0,                          # RSB T2
    drop_path=0.0,                        # RSB T2: no stochastic depth for A3
    repeated_aug=0,                       # RSB T2: no repeated augmentation for A3
    clip=None,                            # RSB T2; LAMB itself clips to global norm 1 (timm)
    auto_augment="rand-m6-mstd0.5-inc1",  # RSB T2: RandAugment 6 / 0.5
    mixup=0.1,                            # RSB T2
    cutmix=1.0,                           # RSB T2
    reprob=0.0,                           # RSB T2: no random erasing
    ema_decay=None,                       # RSB T2: no EMA
    amp=True,                             # RSB T2: mixed precision
    paper_top1=78.1,                      # RSB Table 1
    top1_source="RSB Table 1",
)

# --demo: ResNet-18 on the generated 8-class shapes at 48 px; a few minutes on a laptop CPU
DEMO = dict(model="resnet18", epochs=30, warmup_epochs=1, batch_size=32, lr=8e-3,
            train_size=48, eval_size=48, crop_pct=1.0)

if __name__ == "__main__":
    main(RECIPE, DEMO)
