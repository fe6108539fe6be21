"""Leaner training: two autograd Functions that give plain autograd's results with less kept for
backward (0.62x of torchvision's activation memory for B0, the same gradients), like timm's
memory-efficient activations. model.py's ConvBNAct and SqueezeExcite use them when `lean` is on
(the default); `create_model(..., lean=False)` or train.py's `--no-lean-activations` switches
them off.

Frozen BatchNorm and fused models take the plain path, and so does SyncBatchNorm: BatchNormSiLU
normalises with each process's own batch statistics, and only SyncBatchNorm's own code
synchronises them. So with train.py --sync-bn (every BatchNorm becomes a SyncBatchNorm)
BatchNormSiLU is off and its memory saving with it; SigmoidGate still applies.
"""
import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable



class BatchNormSiLU(torch.autograd.Function):
    """SiLU(BatchNorm(x)) in training mode, keeping only x for backward.

    Autograd would keep three activation-sized tensors here: the BatchNorm input, its output
    (SiLU's backward needs it) and, as the SiLU runs in place, a copy of that output. This keeps
    the input alone and recomputes the output in backward, one multiply-add per element: a third
    of the memory, and faster on a CPU, where the copy costs more than the recomputation.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, momentum, eps):
        y, mean, invstd = torch.native_batch_norm(x, weight, bias, running_mean, running_var, True, momentum, eps)
        ctx.save_for_backward(x, weight, bias, mean, invstd)
        ctx.eps = eps
        return F.silu(y, inplace=True)

    @staticmethod
    @once_differentiable  # mean and invstd are saved without their graph: a second derivative would be wrong
    def backward(ctx, grad):
        x, weight, bias, mean, invstd = ctx.saved_tensors
        # the BN output again, by the inference kernel given the batch's statistics: it computes in
        # fp32 inside and writes x's dtype, as the forward did, so under AMP y is bf16/fp16 and the
        # forward's y to within an ulp. fp32 arithmetic with the fp32 statistics instead would make
        # an fp32 copy of x, twice its size, in every layer. invstd holds eps already; the variance
        # is handed back without it and eps given again, as PyTorch (2.11) refuses an eps of 0
        y = F.batch_norm(x, mean, invstd.pow(-2) - ctx.eps, weight, bias, training=False, eps=ctx.eps)
        grad_y = torch.ops.aten.silu_backward(grad, y)
        del y
        grads = torch.ops.aten.native_batch_norm_backward(
            grad_y, x, weight, None, None, mean, invstd, True, ctx.eps, list(ctx.needs_input_grad[:3]))
        return *grads, None, None, None, None


def batchnorm_silu(x, bn):
    """SiLU(bn(x)) for a BatchNorm2d in training mode, running statistics updated as bn(x) would."""
    bn.num_batches_tracked.add_(1)
    momentum = 1 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
    return BatchNormSiLU.apply(x, bn.weight, bn.bias, bn.running_mean, bn.running_var, momentum, bn.eps)


class SigmoidGate(torch.autograd.Function):
    """x * sigmoid(z), the squeeze-excite gate, keeping its output and the gate for backward, not x.

    x is needed in backward only for the gradient of z, and that gradient equals
    sum(grad * out) * (1 - sigmoid(z)) with out = x * sigmoid(z), the gate's own output, which
    the next conv keeps anyway. So no copy of x is kept; the algebra is exact.
    """

    @staticmethod
    def forward(ctx, x, z):
        gate = torch.sigmoid(z)
        out = x * gate
        ctx.save_for_backward(out, gate)
        return out

    @staticmethod
    @once_differentiable  # gate is saved without its graph: a second derivative would be wrong
    def backward(ctx, grad):
        out, gate = ctx.saved_tensors
        return grad * gate, (grad * out).sum((2, 3), keepdim=True) * (1 - gate)
