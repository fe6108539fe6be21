"""The tutorial's training program, the baseline of train.py in --whole and --time-to-accuracy:
torchvision's EfficientNet-B0 from scratch, its 80/20 split of the class folders, its dataset
class, transforms and worker count, SGD with momentum and its cosine schedule, tqdm bars, and a
state_dict saved every epoch. It runs by itself:

    python benchmarks/tutorial_train.py --data-path DIR --output-dir OUT [--epochs 30] ...

After each epoch it prints `epoch N accuracy A seconds S`: the benchmark reads its val top-1 and
its epoch time from that line, since the tutorial's program writes nothing else to read."""
import argparse
import math
import os
import random
import sys
import time

import torch
import torchvision
from PIL import Image
from torchvision import transforms
from tqdm import tqdm


class Images(torch.utils.data.Dataset):
    """(path, label) pairs opened one at a time, as the tutorial's dataset class does."""

    def __init__(self, items, transform):
        self.items, self.transform = items, transform

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.transform(Image.open(self.items[i][0]).convert("RGB")), self.items[i][1]


def split(root):
    """The tutorial's split: a fifth of each class folder, drawn at random, for validation."""
    random.seed(0)
    classes = sorted(c for c in os.listdir(root) if os.path.isdir(os.path.join(root, c)))
    train, val = [], []
    for label, c in enumerate(classes):
        files = sorted(os.path.join(root, c, f) for f in os.listdir(os.path.join(root, c)))
        held = set(random.sample(files, int(len(files) * 0.2)))
        train += [(f, label) for f in files if f not in held]
        val += [(f, label) for f in files if f in held]
    return classes, train, val


def pipelines(size):
    """The tutorial's (training, validation) transforms at `size` px."""
    normalize = transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    train_tf = transforms.Compose([transforms.RandomResizedCrop(size), transforms.RandomHorizontalFlip(),
                                   transforms.ToTensor(), normalize])
    val_tf = transforms.Compose([transforms.Resize(size), transforms.CenterCrop(size), transforms.ToTensor(),
                                 normalize])
    return train_tf, val_tf


def main(args):
    torch.manual_seed(args.seed)
    classes, train, val = split(args.data_path)
    size, batch, epochs = args.img_size, args.batch_size, args.epochs
    train_tf, val_tf = pipelines(size)
    nw = min(os.cpu_count(), batch, 8)
    train_loader = torch.utils.data.DataLoader(Images(train, train_tf), batch_size=batch, shuffle=True,
                                               num_workers=nw)
    val_loader = torch.utils.data.DataLoader(Images(val, val_tf), batch_size=batch, num_workers=nw)
    device = torch.device("cuda:0" if torch.cuda.is_available() else "cpu")  # as the tutorial picks it
    model = torchvision.models.efficientnet_b0(num_classes=len(classes)).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda x: (1 + math.cos(x * math.pi / epochs)) / 2 * 0.99 + 0.01)
    os.makedirs(args.output_dir, exist_ok=True)
    for epoch in range(epochs):
        start = time.perf_counter()
        model.train()
        bar = tqdm(train_loader, file=sys.stdout)
        for images, labels in bar:
            images, labels = images.to(device), labels.to(device)
            optimizer.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(images), labels)
            loss.backward()
            optimizer.step()
            bar.desc = f"[epoch {epoch}] loss {loss.item():.3f}"
        scheduler.step()
        model.eval()
        correct = 0
        with torch.no_grad():
            for images, labels in tqdm(val_loader, file=sys.stdout):
                correct += (model(images.to(device)).argmax(1).cpu() == labels).sum().item()
        torch.save(model.state_dict(), os.path.join(args.output_dir, f"model-{epoch}.pth"))
        print(f"epoch {epoch} accuracy {correct / len(val):.4f} seconds {time.perf_counter() - start:.2f}")


if __name__ == "__main__":  # the loader's workers may start by importing this file (spawn)
    parser = argparse.ArgumentParser(description="The tutorial's training loop on torchvision's B0.")
    parser.add_argument("--data-path", required=True, help="a folder of class folders")
    parser.add_argument("--output-dir", required=True, help="where model-N.pth goes after each epoch")
    parser.add_argument("--epochs", type=int, default=30, help="epochs; the cosine schedule spans them")
    parser.add_argument("--img-size", type=int, default=224, help="training and validation resolution")
    parser.add_argument("--batch-size", type=int, default=16, help="images per step")
    parser.add_argument("--seed", type=int, default=0, help="torch's seed (the split's is always 0)")
    main(parser.parse_args())
