"""torchvision's plain start of training, the baseline of --startup: ImageFolder over the class
folders, random_split, a DataLoader and one SGD step on B0 at 64 px. --startup runs it under
until_first_step.py and stops the clock at that step:

    python benchmarks/plain_start.py DATA WORKERS
"""
import sys

import torch
import torchvision
from torchvision import transforms

if __name__ == "__main__":  # the loader's workers may start by importing this file (spawn)
    data = torchvision.datasets.ImageFolder(sys.argv[1], transforms.Compose([
        transforms.RandomResizedCrop(64), transforms.RandomHorizontalFlip(), transforms.ToTensor()]))
    n_val = int(len(data) * 0.2)
    train, val = torch.utils.data.random_split(data, [len(data) - n_val, n_val], torch.Generator().manual_seed(0))
    loader = torch.utils.data.DataLoader(train, batch_size=16, shuffle=True, num_workers=int(sys.argv[2]))
    model = torchvision.models.efficientnet_b0(num_classes=len(data.classes))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    images, labels = next(iter(loader))
    torch.nn.functional.cross_entropy(model(images), labels).backward()
    optimizer.step()
