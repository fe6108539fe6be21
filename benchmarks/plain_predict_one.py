"""The six lines that predict one image with torchvision, predict.py's baseline for one image in
--whole, where launch to answer is what counts:

    python benchmarks/plain_predict_one.py WEIGHTS IMAGE
"""
import sys, torch, torchvision  # noqa: E401
from PIL import Image
model = torchvision.models.efficientnet_b0(); model.load_state_dict(torch.load(sys.argv[1])); model.eval()  # noqa: E702
x = torchvision.models.EfficientNet_B0_Weights.IMAGENET1K_V1.transforms()(Image.open(sys.argv[2]).convert("RGB"))
with torch.no_grad(): p = model(x[None]).softmax(1)[0]  # noqa: E701
print(p.argmax().item(), f"{p.max():.3f}")
