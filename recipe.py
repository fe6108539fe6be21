"""How train.py optimises: the optimizer (no weight decay on BatchNorm and biases), the learning
rate's warm-up and cosine decay, and the moving average of the weights that is evaluated and
saved. The defaults, and how they were chosen: README's "Recipe" and docs/recipe.md.

    optimizer = recipe.build_optimizer(args, model)       # args.optimizer, lr, weight_decay
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, recipe.lr_lambda(args, steps_per_epoch))
    ema = recipe.EMA(model, decay=0.999)                  # ema.update_parameters(model) after each step
"""
import math

import torch
from torch.optim.swa_utils import AveragedModel

# the peak learning rate for a global batch of 16, from scratch; fine-tuning takes a quarter of it
BASE_LR = {"adamw": 1e-3, "sgd": 0.02, "rmsprop": 1e-3}
FINE_TUNE_DIVISOR = 4  # pretrained weights want gentler steps
WEIGHT_DECAY = {"adamw": 0.05, "sgd": 1e-5, "rmsprop": 1e-5}


def default_lr(optimizer, pretrained):
    """--lr when none is given: BASE_LR, a quarter of it with --weights."""
    return BASE_LR[optimizer] / (FINE_TUNE_DIVISOR if pretrained else 1)


def _number(x):
    return f"{x:g}".replace("e-0", "e-")  # 0.001, 0.05, 1e-5


# the defaults as train.py --help says them
LR_HELP = (", ".join(f"{name} {_number(lr)}" for name, lr in BASE_LR.items())
           + f" for a global batch of 16, 1/{FINE_TUNE_DIVISOR} of that with --weights")
WEIGHT_DECAY_HELP = (f"adamw {_number(WEIGHT_DECAY['adamw'])}, else {_number(WEIGHT_DECAY['sgd'])}")


def build_optimizer(args, model):
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            # BatchNorm weights and all biases are 1-d: decaying them only hurts
            (no_decay if p.ndim <= 1 else decay).append(p)
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if args.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=args.lr, momentum=0.9, nesterov=True)
    if args.optimizer == "rmsprop":  # the paper's optimizer, with TF's decay, momentum and epsilon
        return torch.optim.RMSprop(groups, lr=args.lr, alpha=0.9, momentum=0.9, eps=1e-3)
    # fused: the whole update in one kernel, 1.10x the training step on a CPU (same accuracy in
    # docs/recipe.md); PyTorch has it for CPUs and CUDA GPUs
    fused = any(p.device.type in ("cpu", "cuda") for p in decay + no_decay)
    return torch.optim.AdamW(groups, lr=args.lr, fused=fused)


class EMA(AveragedModel):
    """The exponential moving average of the weights and BatchNorm buffers, as AveragedModel keeps
    it (its n_averaged counts the updates, saved in last.pth). After n updates the decay is
    1 - (1 + n) ** -0.75 (up to `decay`): the average follows the weights closely at first, then
    spans more and more steps (about 60 after 220 updates, the whole of a short run's last epochs),
    and reaches 0.999 after 10,000 updates. A short run is then neither stuck near the random
    initial weights nor at the mercy of its last few steps.
    An update is one foreach lerp over all tensors, not one kernel per tensor (360 for B0), and
    never waits for the GPU: the count it needs is kept in Python, where AveragedModel reads its
    tensor n_averaged back from the device twice per update."""

    def __init__(self, model, decay):
        super().__init__(model, use_buffers=True)
        self.decay, self.count = decay, None

    def load_state_dict(self, *args, **kwargs):
        self.count = None  # read from the loaded n_averaged at the next update
        return super().load_state_dict(*args, **kwargs)

    @torch.no_grad()
    def update_parameters(self, model):
        if self.count is None:
            self.count = int(self.n_averaged)
        averaged = [*self.module.parameters(), *self.module.buffers()]
        current = [t.detach() for t in (*model.parameters(), *model.buffers())]
        if self.count == 0:
            torch._foreach_copy_(averaged, current)
        else:
            floats = [i for i, a in enumerate(averaged) if a.is_floating_point()]
            counters = [i for i, a in enumerate(averaged) if not a.is_floating_point()]  # num_batches_tracked
            weight = 1 - min(self.decay, 1 - (1 + self.count) ** -0.75)
            torch._foreach_lerp_([averaged[i] for i in floats], [current[i] for i in floats], weight)
            if counters:
                torch._foreach_copy_([averaged[i] for i in counters], [current[i] for i in counters])
        self.n_averaged += 1
        self.count += 1


def lr_lambda(args, steps_per_epoch):
    """Linear warm-up, then cosine decay from 1 to lrf; one call per optimizer step."""
    warmup = round(args.warmup_epochs * steps_per_epoch)
    total = max(args.epochs * steps_per_epoch, warmup + 1)

    def factor(step):
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(total - warmup, 1)
        return args.lrf + (1 - args.lrf) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return factor
