"""The random choices of whole epochs against the reference's (issue 22). The parity tests show
that one draw gives timm's (or torchvision's) pixels; these show that the draws of a run come
at the reference's rates and in its distributions: this code's loader with its per-batch
reseeding in 2 workers, and its per-step reseeding of the main process, against timm's own
loader, RandAugment, RandomErasing and Mixup (torchvision's TrivialAugmentWide and
RandomErasing) drawing from their own streams, seeded once as their train.py does.

Each comparison is a two-sample test at level 0.001: Kolmogorov-Smirnov for a continuous
quantity, chi-square for counts (frequencies, rates), Fisher's z for a correlation. Each family
of tests is also run on a deliberately faulty stream (a reseed that repeats, a draw used twice,
an op drawn without replacement, a switch decided per epoch) and must reject it."""
import collections
import json
import math
import os
import random

import numpy as np
import pytest
import torch
from PIL import Image

import common

EPOCHS, BATCH, IMAGES, SIZE = 8, 16, 256, 16  # 2,048 images a side
RAND_AUGMENT = "rand-m6-mstd0.5-inc1"  # A1-A3's


# ----------------------------------------------------------------------------------------------
# Two-sample tests, level 0.001
# ----------------------------------------------------------------------------------------------

def ks(a, b, level=0.001):
    """Kolmogorov-Smirnov: (statistic, asymptotic critical value at `level`)."""
    a, b = np.sort(np.asarray(a, float)), np.sort(np.asarray(b, float))
    grid = np.concatenate([a, b])
    d = np.abs(np.searchsorted(a, grid, side="right") / len(a)
               - np.searchsorted(b, grid, side="right") / len(b)).max()
    c = math.sqrt(-math.log(level / 2) / 2)  # 1.949 at 0.001
    return float(d), c * math.sqrt((len(a) + len(b)) / (len(a) * len(b)))


def chi2(a, b):
    """Chi-square test of homogeneity of two count tables {category: count}: (statistic,
    critical value at 0.001: exact for 1 and 2 degrees of freedom, Wilson-Hilferty's
    approximation above, within 2% of the exact one)."""
    keys = sorted(set(a) | set(b), key=str)
    x = np.array([a.get(k, 0) for k in keys], float)
    y = np.array([b.get(k, 0) for k in keys], float)
    total = x + y
    ex, ey = total * x.sum() / total.sum(), total * y.sum() / total.sum()
    stat = float(((x - ex) ** 2 / ex + (y - ey) ** 2 / ey).sum())
    df = len(keys) - 1
    if df <= 2:
        return stat, (10.828, 13.816)[df - 1]
    return stat, df * (1 - 2 / (9 * df) + 3.090 * math.sqrt(2 / (9 * df))) ** 3


def fisher_z(x1, y1, x2, y2):
    """|z| of the difference of two Pearson correlations (critical value 3.29 at 0.001)."""
    r1, r2 = np.corrcoef(x1, y1)[0, 1], np.corrcoef(x2, y2)[0, 1]
    return abs(math.atanh(r1) - math.atanh(r2)) / math.sqrt(1 / (len(x1) - 3) + 1 / (len(x2) - 3))


def same(stat_crit):
    stat, crit = stat_crit
    return stat < crit


def test_the_tests_reject_what_they_should():
    rng = np.random.default_rng(0)
    assert same(ks(rng.uniform(size=2000), rng.uniform(size=2000)))
    assert not same(ks(rng.uniform(size=2000), rng.uniform(size=2000) ** 0.8))
    assert same(chi2({0: 1000, 1: 1000}, {0: 1010, 1: 990}))
    assert not same(chi2({0: 1000, 1: 1000}, {0: 1150, 1: 850}))
    # the Wilson-Hilferty critical values against the exact 0.999 quantiles
    for df, exact in ((3, 16.266), (14, 36.123), (30, 59.703)):
        k = {i: 100 for i in range(df + 1)}
        assert abs(chi2(k, k)[1] / exact - 1) < 0.02


# ----------------------------------------------------------------------------------------------
# Recording the draws: functions wrapped before the loader forks its workers; every process
# appends one JSON line per event to its own file
# ----------------------------------------------------------------------------------------------

class Recorder:
    def __init__(self, folder):
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)

    def __call__(self, *event):
        with open(self.folder / f"{os.getpid()}.jsonl", "a") as f:
            f.write(json.dumps(event) + "\n")

    def images(self):
        """The events of each image (a crop starts an image), in each process's order, and
        the images cut into batches (every worker makes whole batches)."""
        images, batches = [], []
        for path in sorted(self.folder.glob("*.jsonl")):
            mine = []
            for line in path.read_text().splitlines():
                event = json.loads(line)
                if event[0] == "crop":
                    mine.append([])
                mine[-1].append(event)
            assert len(mine) % BATCH == 0
            images += mine
            batches += [mine[k:k + BATCH] for k in range(0, len(mine), BATCH)]
        return images, batches


def record_flips(monkeypatch, record):
    """A horizontal flip is Image.transpose(FLIP_LEFT_RIGHT) on both sides (tv's hflip of a PIL
    image); no RandAugment op transposes."""
    transpose = Image.Image.transpose

    def recorded(self, method):
        if method == Image.Transpose.FLIP_LEFT_RIGHT:
            record("flip")
        return transpose(self, method)
    monkeypatch.setattr(Image.Image, "transpose", recorded)


def crop_event(width, height, box):
    top, left, h, w = box
    return ("crop", h * w / (width * height), math.log(w / h), (left + w / 2) / width,
            (top + h / 2) / height, box)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """256 noise PNGs of 48 x 32 (not square: the crop's rejection and fallback happen)."""
    root = tmp_path_factory.mktemp("streams")
    rng = np.random.default_rng(0)
    for i in range(IMAGES):
        folder = root / f"c{i % 2}"
        folder.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (32, 48, 3), dtype=np.uint8)).save(
            folder / f"{i:03d}.png")
    return root


def our_loader(photos, tmp_path, monkeypatch, auto_augment, interpolation="bicubic", seed=0):
    """Every event of EPOCHS epochs of this code's train loader (2 workers, per-batch reseed)."""
    record = Recorder(tmp_path / "ours")
    with monkeypatch.context() as monkeypatch:
        crop = common.random_resized_crop_params

        def recorded_crop(width, height, scale, ratio, rng=random):
            box = crop(width, height, scale, ratio, rng)
            record(*crop_event(width, height, box))
            return box
        monkeypatch.setattr(common, "random_resized_crop_params", recorded_crop)
        record_flips(monkeypatch, record)
        for name in ("augment_op", "trivial_augment_op"):
            def recorded_op(img, op, magnitude, *args, _original=getattr(common, name), **kw):
                record("op", op, magnitude)
                return _original(img, op, magnitude, *args, **kw)
            monkeypatch.setattr(common, name, recorded_op)
        data = common.ImageFolder(photos, common.TrainTransform(SIZE, interpolation, auto_augment))
        sampler = common.TrainSampler(len(data), BATCH,
                                      seed=common.seed_for(seed, common.SEED_ORDER),
                                      batch_seed=common.seed_for(seed, common.SEED_BATCH))
        loader = common.make_loader(data, BATCH, 2, torch.device("cpu"), sampler, True)
        for epoch in range(EPOCHS):
            sampler.set_epoch(epoch)
            for _ in loader:
                pass
        del loader
        return record.images()


def timm_loader(photos, tmp_path, monkeypatch, seed=0):
    """The same from timm's create_loader as its train.py builds it (--no-prefetcher, 2
    workers, worker_seeding 'all', seeded by utils.random_seed), RandAugment's ops recorded
    through each AugmentOp's level_fn (the magnitude it applies) and aug_fn (applied)."""
    from timm.data import ImageDataset, create_loader
    from timm.data.auto_augment import RandAugment
    from timm.data.transforms import RandomResizedCropAndInterpolation
    from timm.utils import random_seed
    record = Recorder(tmp_path / "timm")
    with monkeypatch.context() as monkeypatch:
        record_flips(monkeypatch, record)
        random_seed(seed, 0)
        data = ImageDataset(str(photos))
        loader = create_loader(data, (3, SIZE, SIZE), BATCH, is_training=True, use_prefetcher=False,
                               auto_augment=RAND_AUGMENT, interpolation="bicubic", num_workers=2,
                               device=torch.device("cpu"))
        for t in data.transform.transforms:
            if isinstance(t, RandomResizedCropAndInterpolation):
                def get_params(img, scale, ratio, _original=t.get_params):
                    box = _original(img, scale, ratio)
                    record(*crop_event(*img.size, box))
                    return box
                t.get_params = get_params
            if isinstance(t, RandAugment):
                for op in t.ops:
                    last = {}

                    def level_fn(magnitude, hparams, _original=op.level_fn, _last=last):
                        _last["m"] = magnitude
                        return _original(magnitude, hparams)

                    def aug_fn(img, *args, _original=op.aug_fn, _name=op.name, _last=last, **kw):
                        record("op", _name, _last.pop("m", None))
                        return _original(img, *args, **kw)
                    if op.level_fn is not None:
                        op.level_fn = level_fn
                    op.aug_fn = aug_fn
        for _ in range(EPOCHS):
            for _ in loader:
                pass
        del loader
        return record.images()


def crops(images):
    return np.array([image[0][1:5] for image in images])


def flips(images):
    return [sum(e[0] == "flip" for e in image) for image in images]


def ops(images):
    return [[e[1:] for e in image if e[0] == "op"] for image in images]


UNLEVELLED = {"AutoContrast", "Equalize", "Invert"}  # ops without a magnitude (timm: no level_fn)


def loader_checks(ours, theirs):
    """The loader-side comparisons; a list of what differs."""
    (mine, my_batches), (ref, ref_batches) = ours, theirs
    bad = []
    a, b = crops(mine), crops(ref)
    for k, what in enumerate(("crop scale", "crop log aspect", "crop centre x", "crop centre y")):
        if not same(ks(a[:, k], b[:, k])):
            bad.append(what)
    if fisher_z(a[:, 0], a[:, 1], b[:, 0], b[:, 1]) > 3.29:
        bad.append("correlation of scale and aspect")
    fa, fb = flips(mine), flips(ref)
    if not same(chi2(collections.Counter(fa), collections.Counter(fb))):
        bad.append("flip rate")
    per_batch = [collections.Counter(sum(flips(batch)) for batch in bs)
                 for bs in (my_batches, ref_batches)]
    if not same(ks([k for k, n in per_batch[0].items() for _ in range(n)],
                   [k for k, n in per_batch[1].items() for _ in range(n)])):
        bad.append("flips per batch")
    oa, ob = ops(mine), ops(ref)
    if any(oa) or any(ob):
        if not same(chi2(collections.Counter(o[0] for img in oa for o in img),
                         collections.Counter(o[0] for img in ob for o in img))):
            bad.append("op frequencies")
        if not same(chi2(collections.Counter(map(len, oa)), collections.Counter(map(len, ob)))):
            bad.append("ops applied per image")
        if not same(ks([o[1] for img in oa for o in img if o[0] not in UNLEVELLED],
                       [o[1] for img in ob for o in img if o[0] not in UNLEVELLED])):
            bad.append("magnitudes")
        twice = [collections.Counter(len(img) == 2 and img[0][0] == img[1][0] for img in o)
                 for o in (oa, ob)]
        if not same(chi2(*twice)):
            bad.append("the same op twice on an image")
    return bad


def no_repeats(batches):
    """Every batch of the run has its own draws (boxes, flips and ops of its images)."""
    keys = [json.dumps(batch) for batch in batches]
    return len(set(keys)) == len(keys)


def test_loader_draws_are_timms_over_a_run(photos, tmp_path, monkeypatch):
    """A1-A3's loader (crop, flip, RandAugment rand-m6-mstd0.5-inc1) over 8 epochs, 2,048 images
    a side: the crop's scale, aspect, centre and their correlation, the flip rate and flips
    per batch, RandAugment's op frequencies, ops applied per image, magnitudes and repeats of
    one op are timm's; no two batches of the run share their draws."""
    ours = our_loader(photos, tmp_path, monkeypatch, RAND_AUGMENT)
    theirs = timm_loader(photos, tmp_path, monkeypatch)
    assert len(ours[0]) == len(theirs[0]) == EPOCHS * IMAGES
    assert loader_checks(ours, theirs) == []
    assert no_repeats(ours[1])
    assert {o[0] for img in ops(ours[0]) for o in img} == set(
        common.parse_rand_augment(RAND_AUGMENT)["ops"])


def test_loader_checks_catch_faulty_streams(photos, tmp_path, monkeypatch):
    """The same checks reject this code's loader with a fault put in: (1) a batch seed that
    ignores the epoch (a reseed that repeats: batch k of every epoch draws alike); (2) the
    crop's aspect drawn from the number its scale used (a draw used twice); (3) the flip
    decided once per batch; (4) RandAugment's ops drawn without replacement."""
    theirs = timm_loader(photos, tmp_path / "timm", monkeypatch)
    faults = {}
    with monkeypatch.context() as m:
        keys = common.batch_keys
        m.setattr(common, "batch_keys", lambda chunks, seed, epoch: keys(chunks, seed, 0))
        faults["repeat"] = our_loader(photos, tmp_path / "1", m, RAND_AUGMENT)
    with monkeypatch.context() as m:
        class Twice:  # the scale's uniform number used again for the aspect
            def uniform(self, lo, hi):
                if getattr(self, "u", None) is None:
                    self.u = random.random()
                    return lo + (hi - lo) * self.u
                u, self.u = self.u, None
                return lo + (hi - lo) * u

            def randint(self, lo, hi):
                return random.randint(lo, hi)
        crop, twice = common.random_resized_crop_params, Twice()
        m.setattr(common, "random_resized_crop_params",
                  lambda w, h, scale, ratio, rng=None: crop(w, h, scale, ratio, twice))
        faults["twice"] = our_loader(photos, tmp_path / "2", m, RAND_AUGMENT)
    with monkeypatch.context() as m:
        rand = torch.rand

        def once_a_batch(*shape, **kw):  # every image of a worker's batch flips alike
            state = torch.random.get_rng_state()
            value = rand(*shape, **kw)
            torch.random.set_rng_state(state)
            return value
        m.setattr(common.torch, "rand", once_a_batch)
        faults["flip"] = our_loader(photos, tmp_path / "3", m, RAND_AUGMENT)
    with monkeypatch.context() as m:
        choice = np.random.choice
        m.setattr(common.np.random, "choice", lambda a, size: choice(a, size, replace=False))
        faults["ops"] = our_loader(photos, tmp_path / "4", m, RAND_AUGMENT)
    assert not no_repeats(faults["repeat"][1])
    assert "correlation of scale and aspect" in loader_checks(faults["twice"], theirs)
    assert "flips per batch" in loader_checks(faults["flip"], theirs)
    assert "the same op twice on an image" in loader_checks(faults["ops"], theirs)


def test_trivial_augment_draws_are_torchvisions_over_a_run(photos, tmp_path, monkeypatch):
    """tv's loader (crop, flip, TrivialAugment Wide) over 8 epochs against torchvision's
    RandomResizedCrop + RandomHorizontalFlip + TrivialAugmentWide in a 2-worker DataLoader
    seeded as tv's train.py leaves it (torch's default per-worker seeds): op frequencies,
    magnitude bins, the sign rate of the signed ops, crop and flip as above."""
    import torchvision.transforms as T
    import torchvision.transforms.autoaugment as tv_aa
    from torchvision.datasets import ImageFolder
    ours = our_loader(photos, tmp_path, monkeypatch, "ta_wide", "bilinear")
    record = Recorder(tmp_path / "tv")
    record_flips(monkeypatch, record)
    apply_op = tv_aa._apply_op

    def recorded(img, op_name, magnitude, interpolation, fill):
        record("op", op_name, magnitude)
        return apply_op(img, op_name, magnitude, interpolation, fill)
    monkeypatch.setattr(tv_aa, "_apply_op", recorded)
    crop_params = T.RandomResizedCrop.get_params

    def recorded_crop(img, scale, ratio):
        box = crop_params(img, scale, ratio)
        record(*crop_event(*img.size, box))
        return box
    monkeypatch.setattr(T.RandomResizedCrop, "get_params", staticmethod(recorded_crop))
    bilinear = T.InterpolationMode.BILINEAR
    data = ImageFolder(str(photos), T.Compose([
        T.RandomResizedCrop(SIZE, interpolation=bilinear), T.RandomHorizontalFlip(0.5),
        T.TrivialAugmentWide(interpolation=bilinear), T.PILToTensor()]))
    torch.manual_seed(0)
    loader = torch.utils.data.DataLoader(data, BATCH, shuffle=True, num_workers=2,
                                         drop_last=True, persistent_workers=True)
    for _ in range(EPOCHS):
        for _ in loader:
            pass
    del loader
    theirs = record.images()
    assert loader_checks(ours, theirs) == []
    space = tv_aa.TrivialAugmentWide()._augmentation_space(31)

    def bins(images):  # (op, magnitude bin, sign) of each image's op
        out = collections.Counter()
        for image in ops(images[0]):
            (name, m), = image
            values, signed = space[name]
            k = int(torch.argmin((values - abs(m)).abs())) if values.ndim else 0
            out[(k // 4, math.copysign(1, m) if signed and m else 0)] += 1
        return out
    assert same(chi2(bins(ours), bins(theirs)))
    assert no_repeats(ours[1])


# ----------------------------------------------------------------------------------------------
# The main process's draws: Mixup / CutMix and random erasing, reseeded every step
# ----------------------------------------------------------------------------------------------

MIX = dict(mixup=0.1, cutmix=1.0, label_smoothing=0.0, mixup_style="timm", reprob=0.0,
           remode="pixel", recount=1)  # A1-A3's
STEPS = 250  # an epoch of steps; 8 epochs, 2,000 batches a side


def our_steps(monkeypatch, recipe, seed=0, rank=0, step_seed=None):
    """Mixup/CutMix (lam, CutMix or not, box, lam as drawn before the box corrects it) and
    erasing (pixels erased of each image) of each step, as train_step draws them: seed_step,
    then augment_batch on a batch of 8 x 16 px."""
    draws, drawn = [], []
    with monkeypatch.context() as m:
        mix_batch, mix_params = common.mix_batch, common.mix_params

        def recorded(x, target, classes, lam, box=None, *a, **kw):
            draws.append((lam, box is not None, box, drawn[-1]))
            return mix_batch(x, target, classes, lam, box, *a, **kw)

        def recorded_params(*a, **kw):
            lam, cut = mix_params(*a, **kw)
            drawn.append(lam)
            return lam, cut
        m.setattr(common, "mix_batch", recorded)
        m.setattr(common, "mix_params", recorded_params)
        erased = []
        for epoch in range(EPOCHS):
            for step in range(STEPS):
                rng = (step_seed or common.seed_step)(seed, epoch, step, rank)
                x = torch.full((8, 3, SIZE, SIZE), 1e6)
                common.augment_batch(x, torch.arange(8) % 4, dict(MIX, **recipe), 4, rng)
                erased += (x[:, 0] != 1e6).sum((1, 2)).tolist()
    return draws, erased


def timm_steps(recipe, seed=0):
    """The same from timm's Mixup (mode 'batch', as train.py builds it for --mixup/--cutmix)
    and RandomErasing (its prefetcher's, on the CPU), drawing from the streams seeded once."""
    from timm.data import Mixup
    from timm.data.random_erasing import RandomErasing
    from timm.utils import random_seed
    r = dict(MIX, **recipe)
    random_seed(seed, 0)
    mixup = Mixup(mixup_alpha=r["mixup"], cutmix_alpha=r["cutmix"], label_smoothing=0,
                  num_classes=4) if r["mixup"] or r["cutmix"] else None
    erase = RandomErasing(r["reprob"], mode="pixel", max_count=r["recount"], device="cpu") \
        if r["reprob"] else None
    draws, erased = [], []
    if mixup:
        params = mixup._params_per_batch

        def recorded_params():
            lam, cut = params()
            draws.append([lam, cut])
            return lam, cut
        mixup._params_per_batch = recorded_params
    for _ in range(EPOCHS * STEPS):
        x = torch.full((8, 3, SIZE, SIZE), 1e6)
        if mixup:
            lam = mixup._mix_batch(x)
            draws[-1][0] = lam  # corrected by the box's area, as ours records it
        if erase:
            erase(x)
        erased += (x[:, 0] != 1e6).sum((1, 2)).tolist()
    return [tuple(d) for d in draws], erased


def mix_checks(ours, theirs):
    bad = []
    if not same(chi2(collections.Counter(c for _, c, *_ in ours),
                     collections.Counter(c for _, c, *_ in theirs))):
        bad.append("CutMix fraction")
    for cut, what in ((True, "CutMix lambda"), (False, "Mixup lambda")):
        if not same(ks([d[0] for d in ours if d[1] == cut], [d[0] for d in theirs if d[1] == cut])):
            bad.append(what)
    switches = [collections.Counter(a[1] != b[1] for a, b in zip(d, d[1:])) for d in (ours, theirs)]
    if not same(chi2(*switches)):
        bad.append("switches between consecutive batches")
    return bad


def test_mixup_cutmix_draws_are_timms_over_a_run(monkeypatch):
    """Mixup 0.1 / CutMix 1.0 over 2,000 steps: the fraction of CutMix batches, the
    distribution of each lambda (CutMix's corrected by its box) and how often consecutive
    batches switch are timm's; no two steps of the run, nor two ranks' same step, draw alike."""
    ours, _ = our_steps(monkeypatch, {})
    theirs, _ = timm_steps({})
    assert len(ours) == len(theirs) == EPOCHS * STEPS
    assert mix_checks(ours, theirs) == []
    other_rank, _ = our_steps(monkeypatch, {}, rank=1)
    # lam as drawn, from a Beta; Beta(0.1, 0.1) puts 2% of its draws within 1e-9 of 0 or 1,
    # where the floats are too few to tell draws apart
    drawn = [d[3] for d in ours + other_rank if 1e-9 < d[3] < 1 - 1e-9]
    assert len(set(drawn)) == len(drawn) > 0.9 * len(ours + other_rank)


def tv_steps(seed=0):
    """tv's Mixup 0.2 / CutMix 1.0 (its train.py's collate: RandomChoice of v2.MixUp and
    v2.CutMix) over the same steps, torch seeded once: (lam, CutMix or not) of each batch, the
    CutMix lam after its box."""
    from torchvision.transforms import v2
    mixup, cutmix = v2.MixUp(alpha=0.2, num_classes=4), v2.CutMix(alpha=1.0, num_classes=4)
    draws = []
    for t, cut in ((mixup, False), (cutmix, True)):
        def make_params(flat, _original=t.make_params, _cut=cut):
            params = _original(flat)
            draws.append((params["lam_adjusted" if _cut else "lam"], _cut))
            return params
        t.make_params = make_params
    choice = v2.RandomChoice([mixup, cutmix])
    torch.manual_seed(seed)
    for _ in range(EPOCHS * STEPS):
        choice(torch.zeros(8, 3, SIZE, SIZE), torch.arange(8) % 4)
    return draws


def test_tv_mixup_cutmix_draws_are_torchvisions_over_a_run(monkeypatch):
    """tv's recipe (Mixup 0.2, CutMix 1.0, mixup_style tv) over 2,000 reseeded steps against
    torchvision's RandomChoice of v2.MixUp / v2.CutMix: the same checks as timm's."""
    ours, _ = our_steps(monkeypatch, dict(mixup=0.2, mixup_style="tv"))
    theirs = tv_steps()
    assert len(ours) == len(theirs) == EPOCHS * STEPS
    assert mix_checks(ours, theirs) == []


def test_mix_checks_catch_faulty_streams(monkeypatch):
    """A Mixup generator seeded per epoch (the step left out of its seed: every step of an
    epoch draws alike) and a switch biased to CutMix 60% of the time both fail."""
    theirs, _ = timm_steps({})

    def per_epoch(seed, epoch, step, rank):
        common.seed_step(seed, epoch, step, rank)
        return np.random.default_rng([seed, epoch])
    repeating, _ = our_steps(monkeypatch, {}, step_seed=per_epoch)
    assert "switches between consecutive batches" in mix_checks(repeating, theirs)
    mix_params = common.mix_params
    monkeypatch.setattr(common, "mix_params", lambda rng, a, b: mix_params(rng, a, b, 0.6))
    biased, _ = our_steps(monkeypatch, {})
    assert "CutMix fraction" in mix_checks(biased, theirs)


def erase_checks(ours, theirs):
    bad = []
    if not same(chi2(collections.Counter(e > 0 for e in ours),
                     collections.Counter(e > 0 for e in theirs))):
        bad.append("images erased")
    if not same(ks([e for e in ours if e], [e for e in theirs if e])):
        bad.append("area erased")
    return bad


def tv_erased(prob, seed=0):
    """torchvision's RandomErasing(p, value 0), image by image after Normalize as tv's preset
    applies it, from torch's stream seeded once."""
    import torchvision.transforms as T
    erase, erased = T.RandomErasing(prob, value=0), []
    torch.manual_seed(seed)
    for _ in range(EPOCHS * STEPS * 8):
        erased.append(int((erase(torch.full((3, SIZE, SIZE), 1e6))[0] != 1e6).sum()))
    return erased


@pytest.mark.parametrize("recount", [1, 3])
def test_erasing_draws_are_timms_and_torchvisions_over_a_run(monkeypatch, recount):
    """Random erasing over 2,000 steps of 8 images: the fraction of images erased and the
    distribution of the area erased (all boxes of an image) are timm's RandomErasing's
    (reprob 0.25, recount 1 and 3; B, D); tv's variant (reprob 0.1) torchvision's. Faults: a
    probability of 0.3 instead of 0.25, and boxes of the area of one box when there are two or
    three (timm divides the sampled area by the count), fail."""
    recipe = dict(reprob=0.25, recount=recount, mixup=0.0, cutmix=0.0)
    _, ours = our_steps(monkeypatch, recipe)
    _, theirs = timm_steps(recipe)
    assert erase_checks(ours, theirs) == []
    _, faulty = our_steps(monkeypatch, dict(recipe, reprob=0.3))
    assert "images erased" in erase_checks(faulty, theirs)
    if recount > 1:
        erasing = common.random_erasing

        def whole_boxes(x, prob, count=1, min_area=0.02, max_area=1 / 3, **kw):
            # count boxes, each drawn as if alone: the area of one box, not 1/count of it
            return erasing(x, prob, count, min_area * count, max_area * count, **kw)
        monkeypatch.setattr(common, "random_erasing", whole_boxes)
        _, faulty = our_steps(monkeypatch, recipe)
        assert "area erased" in erase_checks(faulty, theirs)
    else:
        _, ours_tv = our_steps(monkeypatch, dict(recipe, reprob=0.1, remode="tv",
                                                 mixup_style="tv"))
        assert erase_checks(ours_tv, tv_erased(0.1)) == []


# ----------------------------------------------------------------------------------------------
# The first draw of a run: the initial weights
# ----------------------------------------------------------------------------------------------

def init_differs(ours, theirs, most=20000):
    """The tensors of two state dicts whose values are not one distribution (KS on at most
    `most` values of each, drawn at random, at 0.001 for the whole state dict: Bonferroni over
    its tensors), or, for a single value, not equal."""
    bad, pick, level = [], np.random.default_rng(0), 0.001 / len(theirs)
    for key, ref in theirs.items():
        mine = ours[key].double().flatten().numpy()
        ref = ref.double().flatten().numpy()
        if len(ref) > most:
            mine, ref = pick.choice(mine, most), pick.choice(ref, most)
        if len(ref) < 2 and not np.array_equal(mine, ref) or len(ref) >= 2 and not same(
                ks(mine, ref, level)):
            bad.append(key)
    return bad


@pytest.mark.parametrize("name", ["resnet18", "resnet50d"])
def test_initial_weights_are_drawn_as_timms(name):
    """Every tensor of a freshly built model (convs, BN weights and buffers, the classifier's
    weight and bias) has timm's distribution; a classifier initialised 20% wider fails."""
    import timm
    torch.manual_seed(0)
    ours = common.create_model(name, num_classes=10).state_dict()
    torch.manual_seed(1)
    theirs = timm.create_model(name, num_classes=10).state_dict()
    assert set(ours) == set(theirs)
    assert init_differs(ours, theirs) == []
    assert init_differs(dict(ours, **{"fc.weight": ours["fc.weight"] * 1.2}), theirs) == \
        ["fc.weight"]
