"""benchmark.py --serve: serve.py under load from 1 and 8 clients, batched against --max-batch 1
and against predict.py's own path over the same JPEGs.

    python benchmark.py --serve --images 200          # B0 at 224 px, JPEGs of 500x375
    python benchmark.py --serve --img-size 64 --images 64

Two real servers (`python serve.py`, one with its default batching, one with --max-batch 1) on
free ports serve the same checkpoint of random weights at --img-size; the clients are threads of
this process, each on a keep-alive connection, each request one JPEG (its bytes as the body). A
pass sends every JPEG once; requests/s is JPEGs/s (img/s), latency is a request's, send to answer.
predict.py's figures come from its own path in this process: the folder as predict.py reads it
(decoding workers, batches of 32), and one image at a time (decode, transform, a batch of 1).
The passes take turns over --rounds; each figure is the median round's. Ratio = the first
contender's figure over the second's (img/s: above 1 is faster; ms: below 1 is quicker)."""
import http.client
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from types import SimpleNamespace

from torch.utils.data import DataLoader

import checkpoint
import model_files
import predict
import runtime
import transforms
from benchmarks.measuring import ROOT, Table, median, write_photos
from model import VARIANTS, create_model

CLIENTS = (1, 8)
BATCH = 32  # predict.py's default --batch-size


def run(args):
    device = runtime.choose_device(args.device)
    size = args.img_size or VARIANTS[args.model].train_size
    with tempfile.TemporaryDirectory() as tmp:
        weights = write_checkpoint(tmp, args.model, size)
        photos = os.path.join(tmp, "photos")
        os.makedirs(photos)
        paths = write_photos(photos, args.images, (500, 375))
        print(f"serve.py under load: {args.model} at {size} px on {device}, {len(paths)} JPEGs of 500x375 a pass; "
              f"its default batching against --max-batch 1, and predict.py's own path over the same JPEGs")
        servers = {"batched": Server(tmp, weights, device),
                   "unbatched": Server(tmp, weights, device, "--max-batch", "1")}
        try:
            for server in servers.values():
                server.ready()
            figures = measure(servers, paths, weights, device, args)
        finally:
            for server in servers.values():
                server.stop()
    table = Table(f"serve.py, median of {args.rounds} rounds")
    for clients in CLIENTS:
        table.row(f"{clients} client{'s' if clients > 1 else ''}: batched vs --max-batch 1",
                  figures[f"unbatched {clients} rate"], figures[f"batched {clients} rate"], "img/s")
    table.row("8 clients: batched server vs predict.py over the folder", figures["folder rate"],
              figures["batched 8 rate"], "img/s")
    table.row("1 client p50 latency vs predict.py's time per image", figures["one image ms"],
              figures["batched 1 p50"], "ms")
    for clients in CLIENTS:
        for q in ("p50", "p95"):
            table.row(f"{clients} client{'s' if clients > 1 else ''} {q} latency: batched vs --max-batch 1",
                      figures[f"unbatched {clients} {q}"], figures[f"batched {clients} {q}"], "ms")
    return table.rows


def write_checkpoint(folder, variant, size):
    """A best.pth of random weights trained (so it says) at `size`: what serve.py and predict.py load."""
    classes = [f"class {i}" for i in range(10)]
    model = create_model(variant, len(classes))
    meta = checkpoint.make_meta(SimpleNamespace(model=variant, img_size=size), classes, VARIANTS[variant],
                                model.bn_eps)
    path = os.path.join(folder, "best.pth")
    checkpoint.save_best(path, model, meta, 1, 0.0)
    return path


def measure(servers, paths, weights, device, args):
    """{figure: its median over the rounds}; the first pass of each contender warms it up, untimed."""
    model, _, transform, resize = model_files.load_model(weights, device=device)
    runner = predict.fast_path(model, device, False)
    contenders = {"folder": lambda: {"folder rate": folder_rate(runner, transform, resize, paths, device, args)},
                  "one image": lambda: {"one image ms": one_image_ms(runner, transform, resize, paths, device)}}
    for name, server in servers.items():
        for clients in CLIENTS:
            contenders[f"{name} {clients}"] = lambda s=server, c=clients, n=name: load(s, paths, c, n)
    for measure_once in contenders.values():
        measure_once()
    rounds = [{k: v for once in contenders.values() for k, v in once().items()} for _ in range(args.rounds)]
    return {k: median([r[k] for r in rounds]) for k in rounds[0]}


def folder_rate(runner, transform, resize, paths, device, args):
    """img/s of predict.py's path over the folder: its loader (decoding workers) and batched predict."""
    dataset = predict.ImagePaths(paths, transform, transforms.eval_draft_size(resize))
    workers = runtime.usable_workers(args.workers) if len(paths) > BATCH else 0
    loader = DataLoader(dataset, batch_size=BATCH, num_workers=workers, collate_fn=predict.ImagePaths.collate,
                        worker_init_fn=runtime.init_loader_worker)
    start = time.perf_counter()
    n = sum(1 for _ in predict.predict(runner, loader, device, 5, normalize=transform.normalize))
    return n / (time.perf_counter() - start)


def one_image_ms(runner, transform, resize, paths, device):
    """The median ms predict.py's path takes for one image alone: decode, transform, a batch of one."""
    dataset = predict.ImagePaths(paths, transform, transforms.eval_draft_size(resize))
    times = []
    for i in range(len(paths)):
        start = time.perf_counter()
        list(predict.predict(runner, [predict.ImagePaths.collate([dataset[i]])], device, 5,
                             normalize=transform.normalize))
        times.append(time.perf_counter() - start)
    return 1000 * median(times)


class Server:
    """`python serve.py --weights WEIGHTS --port 0 FLAGS` until stop(); ready() waits for the address
    it prints, so that two servers start side by side."""

    def __init__(self, folder, weights, device, *flags):
        self.log = open(os.path.join(folder, f"serve{len(flags)}.log"), "w")
        self.proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "serve.py"), "--weights", weights, "--port",
                                      "0", "--device", str(device), *flags], stdout=subprocess.PIPE,
                                     stderr=self.log, text=True)

    def ready(self):
        line = self.proc.stdout.readline()
        address = re.search(r"at http://([\d.]+):(\d+)/", line)
        if not address:
            self.stop()
            sys.exit(f"benchmark: serve.py did not start: {line}")
        self.host, self.port = address[1], int(address[2])

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(60)
        self.log.close()


def load(server, paths, clients, name):
    """{f"{name} {clients} rate": img/s, ... p50, ... p95: ms} of one pass: `clients` threads
    sending every JPEG once between them, each waiting for an answer before it sends the next."""
    bodies = []
    for path in paths:
        with open(path, "rb") as f:
            bodies.append(f.read())
    latencies, failures = [], []

    def client(share):
        conn = http.client.HTTPConnection(server.host, server.port, timeout=120)
        for body in share:
            start = time.perf_counter()
            conn.request("POST", "/predict", body, {"Content-Type": "image/jpeg"})
            response = conn.getresponse()
            response.read()
            latencies.append(time.perf_counter() - start)
            if response.status != 200:
                failures.append(response.status)
        conn.close()

    threads = [threading.Thread(target=client, args=(bodies[i::clients],)) for i in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - start
    if failures:
        sys.exit(f"benchmark: serve.py answered {len(failures)} requests with {sorted(set(failures))}")
    latencies.sort()
    return {f"{name} {clients} rate": len(bodies) / seconds, f"{name} {clients} p50": 1000 * median(latencies),
            f"{name} {clients} p95": 1000 * latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))]}
