"""A plain prediction loop over a folder, predict.py's baseline in --whole: torchvision's B0 and
its eval transform, images opened in the main process, batches of 32, a line per image:

    python benchmarks/plain_predict_folder.py WEIGHTS FOLDER
"""
import os
import sys

import torch
import torchvision
from PIL import Image

model = torchvision.models.efficientnet_b0()
model.load_state_dict(torch.load(sys.argv[1]))
model.eval()
transform = torchvision.models.EfficientNet_B0_Weights.IMAGENET1K_V1.transforms()
paths = sorted(os.path.join(sys.argv[2], f) for f in os.listdir(sys.argv[2]))
with torch.no_grad():
    for i in range(0, len(paths), 32):
        x = torch.stack([transform(Image.open(p).convert("RGB")) for p in paths[i:i + 32]])
        for path, p in zip(paths[i:i + 32], model(x).softmax(1)):
            print(path, p.argmax().item(), f"{p.max():.3f}")
