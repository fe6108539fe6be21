"""Fast inference: BatchNorm folded into the convs (`fuse_bn`, also what export.py writes), and
`CPUInference`, predict.py's fp32 path on a CPU, which runs the folded model as ONNX Runtime
would. CPUInference calls oneDNN's fused ops (`torch.ops.mkldnn`, private to PyTorch):
`CPUInference.available()` says whether this PyTorch has them, and where it has not, the eager
model runs.

    model = CPUInference(fuse_bn(model_files.load_model("best.pth")[0]))
"""
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn.functional as F
from torch import nn

from model import ConvBNAct, SqueezeExcite


@torch.no_grad()
def fuse_bn(model):
    """Fold every BatchNorm into the conv before it (eval only): fewer ops, same outputs."""
    model.eval()
    for m in model.modules():
        if isinstance(m, ConvBNAct) and isinstance(m[1], nn.BatchNorm2d):
            m[0] = torch.nn.utils.fusion.fuse_conv_bn_eval(m[0], m[1])
            m[1] = nn.Identity()
    return model


class OneDNNConv(nn.Module):
    """A BN-fused conv and the SiLU after it as one oneDNN call, its weights put in oneDNN's layout
    once rather than on every call. Inference only: the op has no gradient."""

    def __init__(self, conv, act):
        super().__init__()
        self.args = [list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups]
        self.weight = torch.ops.mkldnn._reorder_convolution_weight(conv.weight.detach(), *self.args)
        self.bias = conv.bias.detach()
        self.act = "swish" if isinstance(act, nn.SiLU) else "none"

    def forward(self, x):
        return torch.ops.mkldnn._convolution_pointwise(x, self.weight, self.bias, *self.args, self.act, [], None)


class MatVec(nn.Module):
    """A 1x1 conv on 1x1 maps (squeeze-excite's two) as the matrix product it is: a conv call
    costs more than the product there, and gains nothing from a second thread."""

    def __init__(self, conv):
        super().__init__()
        self.weight, self.bias = conv.weight.detach().flatten(1), conv.bias.detach()

    def forward(self, x):
        return F.linear(x.flatten(1), self.weight, self.bias)[:, :, None, None]


class CPUInference(nn.Module):
    """fp32 inference on a CPU, as ONNX Runtime does it: each conv with its SiLU one oneDNN call
    (OneDNNConv), squeeze-excite's 1x1 convs as matrix products (MatVec), and a batch split into
    chunks of about `pixels` input pixels (4 images at 224 px), one chunk per core, each on one
    thread: a small chunk keeps its activations in the caches, and a core that runs a chunk of its
    own never waits for another. 1.2-1.3x eager at 64-224 px (docs/performance.md), the same
    outputs to fp32 rounding. Made from a fused eval model (fuse_bn) in place; no gradients."""

    def __init__(self, model, pixels=200_000):
        super().__init__()
        self.model, self.pixels = model, pixels
        for m in self.model.modules():
            if isinstance(m, ConvBNAct) and isinstance(m[1], nn.Identity):
                m[0], m[2] = OneDNNConv(m[0], m[2]), nn.Identity()
            elif isinstance(m, SqueezeExcite):
                m.fc1, m.fc2 = MatVec(m.fc1), MatVec(m.fc2)
        self.pool = None  # threads started for the first batch that is split, ending with the model

    @staticmethod
    def available():
        """oneDNN's fused ops in this PyTorch, on x86 (ARM builds, on the Compute Library, stay eager:
        untested there)."""
        ops = torch.ops.mkldnn
        return torch.backends.mkldnn.is_available() and hasattr(ops, "_convolution_pointwise") \
            and not (hasattr(ops, "_is_mkldnn_acl_supported") and ops._is_mkldnn_acl_supported())

    def _run(self, x):
        with torch.inference_mode():  # grad mode is per thread
            return self.model(x)

    def forward(self, x):
        threads = torch.get_num_threads()
        chunk = max(1, min(self.pixels // (x.shape[2] * x.shape[3]), -(-len(x) // threads)))
        parts = x.split(chunk)
        if len(parts) == 1 or threads == 1:
            return torch.cat([self.model(part) for part in parts])
        if self.pool is None or self.pool_size != threads:
            self.pool, self.pool_size = ThreadPoolExecutor(threads), threads
        torch.set_num_threads(1)
        try:
            return torch.cat(list(self.pool.map(self._run, parts)))
        finally:
            torch.set_num_threads(threads)
