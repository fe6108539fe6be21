"""The training recipe's options: augmentation policies, random erasing, MixUp/CutMix, class
balancing, dropout and stochastic depth, and BatchNorm statistics re-estimated before validation."""
import argparse
import copy
import os
from collections import Counter

import pytest
import torch

import train as train_script
import my_dataset
import recipe
import transforms
import utils
from conftest import DIGITS, FAST, copy_digits, run_script
from model import VARIANTS
from my_dataset import MyDataSet

IMAGE = os.path.join(DIGITS, "3", sorted(os.listdir(os.path.join(DIGITS, "3")))[0])


def augmented(seed, **options):
    """The digit IMAGE as training sees it at 64 px, drawn with `seed`."""
    transform = transforms.build_transform(VARIANTS["b0"], 64, train=True, **options)
    return MyDataSet([IMAGE], [0], transform)[(0, seed)][0]


@pytest.mark.parametrize("policy", transforms.AUTO_AUGMENT)
def test_auto_augment_policies_are_applied_and_follow_the_seed(policy):
    for seed in range(3):
        image = augmented(seed, auto_augment=policy)
        assert image.shape == (3, 64, 64) and image.dtype == torch.uint8  # normalised on the device
        assert torch.equal(image, augmented(seed, auto_augment=policy))  # the same seed, the same image
    # crop and flip draw first, so with and without the policy they are the same: what differs is the policy
    changed = sum(not torch.equal(augmented(seed, auto_augment=policy), augmented(seed)) for seed in range(8))
    assert changed >= 4, f"{policy} changed only {changed} of 8 images"


def test_ra_magnitude_sets_randaugment_strength():
    transform = transforms.build_transform(VARIANTS["b0"], 64, train=True, auto_augment="ra", ra_magnitude=21)
    assert [t.magnitude for t in transform.transforms if type(t).__name__ == "RandAugment"] == [21]
    assert not torch.equal(augmented(5, auto_augment="ra", ra_magnitude=3),
                           augmented(5, auto_augment="ra", ra_magnitude=25))


def test_random_erase_blanks_a_rectangle():
    plain, erased = augmented(1), augmented(1, random_erase=1.0)
    mean = torch.tensor([round(255 * m) for m in VARIANTS["b0"].mean], dtype=torch.uint8).view(3, 1, 1)
    blank = (erased == mean).all(0)  # erased pixels take the data set's mean colour: 0 once normalised
    assert blank.sum() >= 0.02 * 64 * 64 and not (plain == mean).all(0).any()
    normalised = transforms.Normalize(VARIANTS["b0"].mean, VARIANTS["b0"].std)(erased.unsqueeze(0))[0]
    assert normalised[:, blank].abs().max() < 0.01
    rows, cols = blank.any(1).nonzero(), blank.any(0).nonzero()
    box = blank[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
    assert box.all()  # one solid rectangle
    assert torch.equal(erased[:, ~blank], plain[:, ~blank])  # the rest of the image is untouched


@pytest.mark.parametrize("mixup, cutmix, kind", [(0.2, 0, "MixUp"), (0, 1.0, "CutMix"), (0.2, 1.0, "RandomChoice")])
def test_mixup_and_cutmix_give_soft_labels(mixup, cutmix, kind):
    mix = transforms.build_mix(mixup, cutmix, num_classes=5)
    assert type(mix).__name__ == kind
    images, labels = torch.rand(8, 3, 32, 32), torch.arange(8) % 5
    torch.manual_seed(0)
    mixed, soft = mix(images.clone(), labels)
    assert soft.shape == (8, 5) and torch.allclose(soft.sum(1), torch.ones(8))
    assert (soft > 0).sum(1).max() == 2  # each image is a blend of two
    torch.manual_seed(0)
    assert torch.equal(mix(images.clone(), labels)[0], mixed)  # seeded by the run's --seed
    loss = torch.nn.CrossEntropyLoss(label_smoothing=0.1)(torch.randn(8, 5), soft)  # as train.py's criterion
    assert torch.isfinite(loss)
    assert transforms.build_mix(0, 0, 5) is None


def test_balance_draws_every_class_equally_and_splits_among_processes():
    labels = [0] * 80 + [1] * 20 + [2] * 10
    weights = my_dataset.balanced_weights(labels)
    samplers = [my_dataset.EpochSampler(labels, 2, rank, seed=0, weights=weights) for rank in (0, 1)]
    counts, epochs = Counter(), []
    for epoch in range(20):
        parts = []
        for s in samplers:
            s.set_epoch(epoch)
            parts.append([index for index, _ in s])
        assert len(parts[0]) == len(parts[1]) == 55  # each process gets half of an epoch of 110
        counts.update(labels[i] for part in parts for i in part)
        epochs.append(parts)
    assert all(abs(counts[c] / sum(counts.values()) - 1 / 3) < 0.04 for c in range(3)), counts
    assert epochs[0] != epochs[1]  # a new draw each epoch
    samplers[0].set_epoch(0)
    assert [index for index, _ in samplers[0]] == epochs[0][0]  # and the same draw for the same epoch


def test_dropout_and_drop_path_override_the_variant():
    parser = train_script.get_args_parser()
    args = parser.parse_args(["--dropout", "0.45", "--drop-path", "0.1", "--workers", "0"])
    train_script.set_defaults(args)
    model = train_script.build_model(args, 3, None, torch.device("cpu")).raw
    assert model.classifier[0].p == 0.45
    rates = [m.drop_path.p for m in model.features if hasattr(m, "drop_path")]
    assert rates[0] == 0 and rates[-1] == pytest.approx(0.1 * 15 / 16)  # B0 has 16 blocks, rising linearly
    default = train_script.build_model(parser.parse_args(["--workers", "0"]), 3, None, torch.device("cpu")).raw
    assert default.classifier[0].p == VARIANTS["b0"].dropout


def test_precise_bn_gives_the_statistics_of_the_data_and_keeps_the_weights():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Dropout(0.5),
                                torch.nn.Conv2d(4, 2, 1), torch.nn.BatchNorm2d(2))
    data = [(torch.randn(6, 3, 8, 8) * 3 + 2, torch.zeros(6, dtype=torch.long)) for _ in range(4)]
    weights = {k: v.clone() for k, v in model.state_dict().items() if "running" not in k}
    model.train()
    utils.precise_bn(model, data, torch.device("cpu"), show=False)
    features = torch.cat([model[0](images) for images, _ in data])
    batch_means = torch.stack([model[0](images).mean((0, 2, 3)) for images, _ in data])
    assert torch.allclose(model[1].running_mean, batch_means.mean(0), atol=1e-5)
    assert torch.allclose(model[1].running_mean, features.mean((0, 2, 3)), atol=1e-5)
    assert model.training and model[1].momentum == 0.1  # left as it was
    assert all(torch.equal(model.state_dict()[k], v) for k, v in weights.items())  # and the batch count


def test_recipe_flags_train_end_to_end_and_survive_resume(tmp_path):
    """Every option at once on an imbalanced folder: the run trains, shows each class's recall,
    and --resume goes on with the same options."""
    data = tmp_path / "data"
    copy_digits(data, classes=("0", "1"), per_class=12)
    copy_digits(data, classes=("2",), per_class=4)
    out = tmp_path / "run"
    flags = ["--data-path", data, *FAST, "--epochs", "1", "--output-dir", out, "--balance", "--auto-augment", "ra",
             "--ra-magnitude", "12", "--random-erase", "0.5", "--mixup-alpha", "0.2", "--cutmix-alpha", "1.0",
             "--dropout", "0.3", "--drop-path", "0.1", "--precise-bn", "16"]
    result = run_script("train.py", *flags)
    assert "  recall  0 " in result.stdout and " 2 " in result.stdout.split("recall")[1]
    result = run_script("train.py", "--resume", out / "last.pth", "--epochs", "2")
    saved = torch.load(out / "last.pth", weights_only=True)["meta"]["args"]
    assert (saved["balance"], saved["auto_augment"], saved["ra_magnitude"], saved["mixup_alpha"],
            saved["cutmix_alpha"], saved["dropout"], saved["drop_path"], saved["precise_bn"]) == \
        (True, "ra", 12, 0.2, 1.0, 0.3, 0.1, 16)
    assert "epoch 2/2" in result.stdout


def test_adamw_updates_in_one_fused_kernel_and_as_the_plain_loop_does():
    """train.py's AdamW is PyTorch's fused one on a CPU (1.10x the training step; docs/recipe.md
    shows the same accuracy): three steps at lr 1e-2 move each weight as the per-tensor loop does,
    to within a thousandth of one step. That holds on any CPU by construction: the conv has no
    bias before its BatchNorm, as in the network, so every gradient is a real one, and Adam's step
    (m / sqrt(v)) changes only by the rounding of those gradients, relatively. A bias there has a
    gradient of exactly zero in theory, rounding noise in practice, which Adam scales up to a whole
    step: 0.004 (AVX-512) and 0.012 (AVX2) apart on AMD CPUs, where an Intel CPU with AMX stayed
    within 1e-4."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, bias=False), torch.nn.BatchNorm2d(4), torch.nn.Flatten(),
                                torch.nn.LazyLinear(2))
    model(torch.randn(2, 3, 8, 8))
    twin = copy.deepcopy(model)
    lr = 1e-2
    args = argparse.Namespace(optimizer="adamw", lr=lr, weight_decay=0.05)
    fused = recipe.build_optimizer(args, model)
    assert fused.defaults["fused"] is True
    plain = torch.optim.AdamW([{"params": g["params"], "weight_decay": g["weight_decay"]} for g in
                               recipe.build_optimizer(args, twin).param_groups], lr=lr, foreach=False)
    start = [p.detach().clone() for p in model.parameters()]
    for _ in range(3):
        for m, opt in ((model, fused), (twin, plain)):
            opt.zero_grad()
            m(torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))).square().sum().backward()
            opt.step()
    for a, b, before in zip(model.parameters(), twin.parameters(), start):
        assert (a - before).abs().max() > lr  # the weights did move, by about a step each time
        torch.testing.assert_close(a, b, rtol=0, atol=lr * 1e-3)
