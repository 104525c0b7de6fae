"""ResNet-RS (Bello et al. 2021, "Revisiting ResNets: Improved Training and Scaling Strategies";
arXiv 2103.07579, Section 4-5, Tables 7-8): ResNet-D + SE architecture, 350-epoch recipe.

Published: ResNet-RS-50 at 160 px, 78.8% top-1 on ImageNet-1k val (Table 7); `--model` picks
another depth, with the resolution, RandAugment magnitude, drop path and dropout of its
Table 8 row (TABLE8 below; any of them can still be overridden).

    torchrun --nproc_per_node=8 train_rs.py --data /imagenet --model resnetrs101
    python train_rs.py --demo          # a few minutes on a CPU, generated data

Any key can be overridden (`--epochs 100`); the recipe below lists what it sets, every other key
is at its default (common.DEFAULTS, shown by --print-recipe). "RS T8" = Table 8 of the paper.
The paper's code is TensorFlow on TPUs; where it is silent we say what we chose.
"""
from common import main

RECIPE = dict(
    recipe="rs",
    model="resnetrs50",                   # RS T7; see TABLE8 for the others
    epochs=350,                           # RS T8
    warmup_epochs=5,                      # RS §4
    batch_size=4096,                      # RS: the TPU batch; global, lr is for this batch
    train_size=160,                       # RS T8, per model
    eval_size=160,                        # RS: evaluated at the training resolution
    crop_pct=0.875,                       # RS eval: center crop of 0.875
    interpolation="bicubic",              # TPU ResNet preprocessing resizes bicubic
    opt="sgd",                            # RS §4: Momentum, not RMSProp
    lr=1.6,                               # RS T8: 0.1 x batch / 256
    weight_decay=4e-5,                    # RS T8
    momentum=0.9,                         # RS §4
    nesterov=False,                       # TF MomentumOptimizer default
    sched="cosine",                       # RS T8: cosine to 0 ...
    sched_per_step=True,                  # ... per step, as TF schedules
    warmup_lr=0.0,                        # RS T8: warmed up from 0 ...
    warmup_prefix=True,                   # ... then the cosine spans the remaining epochs
    min_lr=0.0,                           # RS T8: decayed to 0
    label_smoothing=0.1,                  # RS T8
    dropout=0.25,                         # RS T8, per model: after the global pool
    drop_path=0.0,                        # RS T8, per model
    zero_init_last=True,                  # RS §4: zero-init of the last BN of each block
    auto_augment="rand-m10-n2",           # RS T8: 2 layers, magnitude 10 (per model); ops of
                                          # timm's RandAugment, not the TF op set
    mixup=0.0,                            # RS uses none
    ema_decay=0.9999,                     # RS T8: weights and BN statistics
    ema_style="tf",                       # TF ExponentialMovingAverage(num_updates=step):
                                          # decay min(0.9999, (1 + n) / (10 + n))
    amp=True,                             # RS: bfloat16 on TPUs
    paper_top1=78.8,                      # RS T7
    top1_source="RS Table 7",
)

# RS Table 8 row per model (one resolution per depth; Table 7 top-1 at that resolution).
# Magnitudes above 10 need mmax: timm clamps at 10 otherwise, TF's RandAugment does not.
TABLE8 = {
    "resnetrs50": dict(train_size=160, eval_size=160, auto_augment="rand-m10-n2",
                       drop_path=0.0, dropout=0.25, paper_top1=78.8),
    "resnetrs101": dict(train_size=192, eval_size=192, auto_augment="rand-m15-n2-mmax15",
                        drop_path=0.0, dropout=0.25, paper_top1=81.2),
    "resnetrs152": dict(train_size=224, eval_size=224, auto_augment="rand-m15-n2-mmax15",
                        drop_path=0.0, dropout=0.25, paper_top1=82.8),
    "resnetrs200": dict(train_size=256, eval_size=256, auto_augment="rand-m15-n2-mmax15",
                        drop_path=0.1, dropout=0.25, paper_top1=83.4),
    "resnetrs270": dict(train_size=256, eval_size=256, auto_augment="rand-m15-n2-mmax15",
                        drop_path=0.1, dropout=0.25, paper_top1=83.8),
    "resnetrs350": dict(train_size=320, eval_size=320, auto_augment="rand-m15-n2-mmax15",
                        drop_path=0.1, dropout=0.4, paper_top1=84.2),
    "resnetrs420": dict(train_size=320, eval_size=320, auto_augment="rand-m15-n2-mmax15",
                        drop_path=0.1, dropout=0.4, paper_top1=84.4),
}

# --demo: ResNet-18 on the generated 8-class shapes at 48 px, lr 0.1 x 32 / 256, a faster EMA
DEMO = dict(model="resnet18", epochs=30, warmup_epochs=1, batch_size=32, lr=0.1 * 32 / 256,
            train_size=48, eval_size=48, crop_pct=1.0, ema_decay=0.99)

if __name__ == "__main__":
    main(RECIPE, DEMO, by_model=TABLE8)
