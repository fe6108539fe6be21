"""Show and call a trained model: a page to try it in a browser, and a JSON API, on this machine.

    python serve.py --weights weights/b0-digits/best.pth          # prints the address to open
    curl -H "Content-Type: image/png" --data-binary @data/digits/3/0003.png "http://127.0.0.1:8000/predict?topk=3"
    curl -F file=@a.jpg -F file=@b.jpg http://127.0.0.1:8000/predict    # several images in one request
    SERVE_TOKEN=$(python -c "import secrets; print(secrets.token_urlsafe())") \\
        python serve.py --weights best.pth --host 0.0.0.0                # other machines: a token required

Each answer is predict.py's for the same file and weights, by construction: the model is loaded,
an image decoded and transformed, and the model called by predict.py's own functions. Requests
that arrive together are computed as one batch in the model's one thread (Batcher), so the event
loop never waits for the model. Needs requirements-serve.txt; docs/deploy.md has the details
(a reverse proxy, TLS, a systemd unit, the batching flags).
"""
import stop_signals  # noqa: F401 -- first: a signal while torch loads ends the script quietly

import sys

try:  # a training user needs none of it, so requirements.txt does not bring it
    import fastapi
    import python_multipart  # noqa: F401 -- here its presence; its parser is imported below
    import uvicorn
except ImportError:
    print("error: serve.py needs fastapi, uvicorn and python-multipart: pip install -r requirements-serve.txt",
          file=sys.stderr)
    sys.exit(2)

import asyncio
import base64
import contextlib
import copy
import errno
import hmac
import io
import ipaddress
import os
import queue
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import torch
import torch.nn.functional as F
from fastapi.responses import HTMLResponse, JSONResponse
from PIL import Image, UnidentifiedImageError
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, MultipartState, parse_options_header
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

import cli
import exported
import model_files
import predict
import pretrained
import runtime
import transforms
import utils
from errors import UsageError, WeightsError
from model import title
from my_dataset import load_rgb

PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "serve.html")
# the page's own inline script and style, the images it shows, calls to this server: nothing else
PAGE_POLICY = ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src blob: data:; "
               "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
# the image formats predict.py reads from a folder: no other Pillow plug-in sees a client's bytes
# (EPS, for one, runs Ghostscript)
FORMATS = sorted({Image.registered_extensions()[ext] for ext in utils.IMG_EXTENSIONS})
MAX_FILES = 64  # per request: 64 decoded images at 600 px are 70 MB, whatever --max-upload-mb allows
GRACE = 30  # seconds a stop waits for the requests in flight before it cuts them off
CAM_ALPHA = 0.45  # the heat map over the image, as predict.py --cam draws it
SWITCH_INTERVAL = 0.0005  # seconds a thread holds the GIL while another waits for it (see main)


def get_args_parser():
    p = cli.ArgumentParser(description="Serve a trained EfficientNet: a page to try it and a JSON API.",
                           usage="%(prog)s --weights FILE|imagenet [--port N] [--host ADDRESS --token T] "
                                 "[more flags, below]")
    predict.add_model_flags(p)  # what predict.py takes
    p.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda or cuda:1")
    p.add_argument("--amp", action="store_true", help="bf16 autocast (fp16 on GPUs without native bf16), as "
                   "predict.py --amp: faster on GPUs, probabilities within 0.02 of fp32's")
    p.add_argument("--tta", action="store_true", help="as predict.py --tta: each image's probabilities averaged with "
                   "its mirror image's (left off for a model trained with --no-hflip)")
    p.add_argument("--host", default="127.0.0.1",
                   help="the address to listen on: 127.0.0.1 is this machine alone; 0.0.0.0 (every interface) "
                        "needs --token")
    p.add_argument("--port", type=int, default=8000, help="the port to listen on; 0 takes a free one (printed)")
    p.add_argument("--token", default=None,
                   help="a secret that /predict and /info then require (Authorization: Bearer TOKEN); default: the "
                        "SERVE_TOKEN environment variable, which other users cannot read in `ps` as they can a flag")
    p.add_argument("--max-batch", type=int, default=16, help="images computed together at most")
    p.add_argument("--max-wait-ms", type=float, default=5,
                   help="how long a batch waits for requests already arriving (a lone request never waits)")
    p.add_argument("--max-queue", type=int, default=64,
                   help="requests inside the server at once (being read, decoded, waiting or computed); one more "
                        "is answered 503 with Retry-After")
    p.add_argument("--max-upload-mb", type=float, default=20, help="the largest request body, in MB (2**20 bytes)")
    return p


def check_args(args):
    """The flags' values, before anything loads: a UsageError names the flag and the fix."""
    for flag, value, least in (("--max-batch", args.max_batch, 1), ("--max-queue", args.max_queue, 1),
                               ("--max-wait-ms", args.max_wait_ms, 0)):
        if value < least:
            raise UsageError(f"{flag} must be at least {least} (got {value:g})")
    if not args.max_upload_mb > 0:
        raise UsageError(f"--max-upload-mb must be more than 0 (got {args.max_upload_mb:g})")
    if not 0 <= args.port <= 65535:
        raise UsageError(f"--port must be 0 to 65535 (got {args.port}); 0 takes a free one")
    if args.weights is None:
        raise UsageError("--weights is required: the weights to serve, e.g. --weights weights/b0-digits/best.pth "
                         "from a train.py run, or --weights imagenet")
    if not loopback(args.host) and not token_of(args):
        raise UsageError(f"--host {args.host} lets other machines call the model: give --token (or set SERVE_TOKEN) "
                         "to a secret, e.g. SERVE_TOKEN=$(python -c \"import secrets; print(secrets.token_urlsafe())\")"
                         ", or keep the default --host 127.0.0.1")


def token_of(args):
    return args.token or os.environ.get("SERVE_TOKEN") or None


def loopback(host):
    """True for an address that only this machine reaches."""
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to an address that others reach
        return False


def listening_socket(host, port):
    """The server's socket, bound now so that a port in use is one line before the model loads;
    uvicorn serves on it. Connections that come before the model is ready wait in its backlog."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror:
        raise UsageError(f"--host {host} is not an address of this machine: use 127.0.0.1 (this machine alone) "
                         "or 0.0.0.0 (every interface, with --token)") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a restart need not wait for old connections
    try:
        sock.bind(address)
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise UsageError(f"--port {port} is in use on {host} (another server?): stop it or choose another port; "
                             "--port 0 takes a free one") from None
        if e.errno == errno.EACCES:
            raise UsageError(f"--port {port} needs root: use a port above 1023, with a reverse proxy in front for 80 "
                             "or 443 (docs/deploy.md)") from None
        raise UsageError(f"--host {host} --port {port}: cannot listen there ({e.strerror})") from None
    return sock


def address_of(sock):
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"


# ---------------------------------------------------------------------------------------------
# The model: predict.py's path, one image or one batch at a time
# ---------------------------------------------------------------------------------------------

class Refusal(Exception):
    """A request answered with `status` and {"error": message}: the client's to fix, or a full queue."""

    def __init__(self, status, message, headers=None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers


class Predictor:
    """A model loaded as predict.py loads it, an uploaded image read as predict.py reads a file, and a
    batch computed by predict.predict: the answers are predict.py --json's."""

    def __init__(self, args):
        self.device = runtime.choose_device(args.device)
        if self.device.type == "cpu":
            runtime.keep_freed_memory()
        runtime.configure_cuda(self.device, train=False)
        self.weights = pretrained.resolve(args.weights, args.model)
        model, self.info, self.transform, resize = model_files.load_model(self.weights, args.model, self.device)
        self.names = model_files.class_names(self.info, self.weights, args.class_indices, self.info["num_classes"])
        self.draft_size = transforms.eval_draft_size(resize)
        self.amp, self.tta = args.amp, args.tta and not (self.info.get("args") or {}).get("no_hflip", False)
        # Grad-CAM's gradients need the model as it is; predict's fast path is made from a copy
        self.cam_model = None if self.info.get("source") == "export" else model
        self.runner = predict.fast_path(copy.deepcopy(model) if self.cam_model else model, self.device, self.amp)
        self.sha256 = self.info.get("sha256") or exported.sha256(self.weights)

    def describe(self):
        """What /info says, and the page shows."""
        return {"model": self.info["variant"], "classes": self.names, "image_size": self.transform.crop,
                "resize": self.transform.resize, "device": str(self.device),
                "computed_in": predict.computed_in(self.amp, self.device, self.info, self.weights, self.runner),
                "tta": self.tta, "cam": self.cam_model is not None, "weights": os.path.basename(self.weights),
                "sha256": self.sha256}

    def decode(self, data, name):
        """One uploaded file as predict.ImagePaths reads one from disk: the eval transform's uint8
        tensor. Pillow's pixel limit (cli.quiet_warnings makes it an error) is checked when the
        header is read, before any pixel is decoded."""
        if not data:
            raise Refusal(400, f"{name} is empty: send the image's bytes")
        try:
            return self.transform(load_rgb(io.BytesIO(data), self.draft_size, FORMATS))
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise Refusal(413, f"{name} has too many pixels ({e})") from None
        except UnidentifiedImageError:
            raise Refusal(400, f"{name} is not an image this server reads ({', '.join(FORMATS)})") from None
        except Exception as e:  # noqa: BLE001 -- Pillow's many ways of failing on a broken file, as ImagePaths
            raise Refusal(400, f"{name}: cannot read image: {predict_error(e)}") from None

    def compute(self, images, options):
        """One answer per image ({"topk": [...]}, and "cam" where asked) for a batch; `options` is
        each image's (topk, cam). The batch is predicted once with the largest topk among them."""
        loader = [(list(range(len(images))), torch.stack(images), [])]
        k = max(topk for topk, _ in options)
        # all of them first: predict holds inference mode on this thread until its last result
        predicted = list(predict.predict(self.runner, loader, self.device, k, self.amp, self.tta,
                                         self.transform.normalize))
        answers = []
        for (_, probs, classes), (topk, cam), image in zip(predicted, options, images):
            answers.append({"topk": predict.top_classes(probs[:topk], classes[:topk], self.names)})
            if cam:
                answers[-1]["cam"] = self.cam_picture(image, classes[0])
        return answers

    def cam_picture(self, image, target):
        """predict.py --cam's right-hand picture as a PNG data URL: the image as the model sees it
        (resized and cropped) under the Grad-CAM of class `target`."""
        import matplotlib  # only for a map asked for: it takes a while to import
        x = self.transform.normalize(image[None].to(self.device, memory_format=torch.channels_last))
        cam, _, _ = predict.grad_cam(self.cam_model, x, target)
        heat = F.interpolate(cam[None, None].float().cpu(), size=image.shape[1:], mode="bilinear",
                             align_corners=False)[0, 0]
        jet = torch.from_numpy(matplotlib.colormaps["jet"](heat.numpy())[..., :3]).float()
        picture = (1 - CAM_ALPHA) * image.permute(1, 2, 0).float() / 255 + CAM_ALPHA * jet
        png = io.BytesIO()
        Image.fromarray((picture * 255).round().to(torch.uint8).numpy()).save(png, "PNG")
        return "data:image/png;base64," + base64.b64encode(png.getvalue()).decode()


def predict_error(e):
    """An exception's first line, as predict.py names an unreadable image."""
    return str(e).splitlines()[0] if str(e) else type(e).__name__


# ---------------------------------------------------------------------------------------------
# Micro-batching: the requests of many clients, one model thread
# ---------------------------------------------------------------------------------------------

class Job(NamedTuple):
    image: torch.Tensor
    options: tuple  # (topk, cam)
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop


class Batcher:
    """The model's one thread and the requests waiting for it. A batch is the oldest image waiting
    and those queued behind it, up to `max_batch`; it waits up to `max_wait` seconds for more only
    while other requests are inside, still being read or decoded, so a lone client never waits.
    At most `max_queue` requests are inside at once; the next is refused with 503."""

    def __init__(self, compute, max_batch, max_wait, max_queue):
        self.compute, self.max_batch, self.max_wait, self.max_queue = compute, max_batch, max_wait, max_queue
        self.jobs = queue.SimpleQueue()
        self.inside = 0  # requests admitted and not answered yet (only the event loop's thread changes
        self.arriving = 0  # these two; the model thread reads `arriving`): of them, those not queued yet
        self.thread = threading.Thread(target=self.work, name="model", daemon=True)

    async def answer(self, read, options):
        """[(answer, batch size)] for each image that `read()` (a coroutine function) gives."""
        if self.inside >= self.max_queue:
            raise Refusal(503, f"the server is busy ({self.inside} requests in progress): try again in a second",
                          {"Retry-After": "1"})
        self.inside += 1
        self.arriving += 1
        try:
            try:
                images = await read()
            finally:
                self.arriving -= 1
            loop = asyncio.get_running_loop()
            futures = [loop.create_future() for _ in images]
            for image, future in zip(images, futures):
                self.jobs.put(Job(image, options, future, loop))
            return await asyncio.gather(*futures)
        finally:
            self.inside -= 1

    def work(self):
        while (first := self.jobs.get()) is not None:
            batch = self.gather(first)
            try:
                answers = self.compute([job.image for job in batch], [job.options for job in batch])
            except Exception as e:  # noqa: BLE001 -- the batch's requests get a 500; the thread goes on
                print(cli.printable(f"serve: error: the model failed on a batch of {len(batch)}: "
                                    f"{predict_error(e)}"), file=sys.stderr, flush=True)
                answers = [e] * len(batch)
            for job, answer in zip(batch, answers):
                job.loop.call_soon_threadsafe(settle, job.future, answer, len(batch))

    def gather(self, first):
        batch, deadline = [first], time.monotonic() + self.max_wait
        while len(batch) < self.max_batch:
            wait = deadline - time.monotonic() if self.arriving else 0
            try:
                job = self.jobs.get(timeout=wait) if wait > 0 else self.jobs.get_nowait()
            except queue.Empty:
                break
            if job is None:  # stop: after this batch
                self.jobs.put(None)
                break
            batch.append(job)
        return batch

    def start(self):
        self.thread.start()

    def stop(self):
        """After uvicorn has answered the requests in flight: nothing is queued any more."""
        self.jobs.put(None)
        self.thread.join(GRACE)


def settle(future, answer, batch):
    if future.done():  # the request was cancelled meanwhile
        return
    if isinstance(answer, Exception):
        future.set_exception(answer)
    else:
        future.set_result((answer, batch))


# ---------------------------------------------------------------------------------------------
# Requests: the body, its images, the options
# ---------------------------------------------------------------------------------------------

async def read_body(request, limit):
    """The request's bytes, kept in memory (never a temporary file), refused past `limit`."""
    too_large = Refusal(413, f"the request is larger than the server's --max-upload-mb {limit / 2**20:g}")
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise too_large
    body = bytearray()
    try:
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise too_large
    except ClientDisconnect:
        raise Refusal(400, "the client went away before the end of the body") from None
    return bytes(body)


def form_files(body, content_type):
    """[(field name, file name, bytes)] of a multipart/form-data body, parsed in memory."""
    _, options = parse_options_header(content_type)
    if not options.get(b"boundary"):
        raise Refusal(400, "a multipart/form-data body needs a boundary in its Content-Type")
    parts, header = [], [b"", b""]  # each part: [Content-Disposition, data]; the header being read: [name, value]

    def header_end():
        if header[0].lower() == b"content-disposition":
            parts[-1][0] = header[1]
        header[:] = [b"", b""]

    parser = MultipartParser(options[b"boundary"], {
        "on_part_begin": lambda: parts.append([b"", bytearray()]),
        "on_header_field": lambda data, start, end: header.__setitem__(0, header[0] + data[start:end]),
        "on_header_value": lambda data, start, end: header.__setitem__(1, header[1] + data[start:end]),
        "on_header_end": header_end,
        "on_part_data": lambda data, start, end: parts[-1][1].extend(data[start:end])})
    try:
        parser.write(body)
    except MultipartParseError as e:
        raise Refusal(400, f"cannot read the multipart/form-data body: {predict_error(e)}") from None
    if parser.state != MultipartState.END:
        raise Refusal(400, "the multipart/form-data body ends before its closing boundary")
    files = []
    for disposition, data in parts:
        params = parse_options_header(disposition)[1]
        files.append((params.get(b"name", b"").decode("utf-8", "replace"),
                      params.get(b"filename", b"").decode("utf-8", "replace"), bytes(data)))
    return files


def images_of(body, content_type, predictor):
    """(the images of a request, their file names or None for a raw body). Run off the event loop:
    parsing and decoding take milliseconds per image."""
    if not content_type.lower().startswith("multipart/form-data"):
        return [predictor.decode(body, "the body")], None
    files = form_files(body, content_type)
    named = [(name, data) for field, name, data in files if field == "file"]
    if not named:
        fields = ", ".join(sorted({field for field, _, _ in files})) or "none"
        raise Refusal(400, f"no form field named file (the fields sent: {fields}): send each image as "
                           "file, e.g. curl -F file=@photo.jpg")
    if len(named) > MAX_FILES:
        raise Refusal(400, f"{len(named)} files in one request: send at most {MAX_FILES}")
    return ([predictor.decode(data, f"file {i} ({name or 'no name'})") for i, (name, data) in enumerate(named, 1)],
            [name for name, _ in named])


def query_options(params, predictor):
    """(topk, cam) of ?topk=N&cam=1."""
    topk, cam = params.get("topk", "1"), params.get("cam", "0").lower()
    classes = len(predictor.names)
    if not (topk.isdigit() and 1 <= int(topk) <= classes):
        raise Refusal(400, f"topk={topk}: give a whole number from 1 to {classes} (this model's classes)")
    if cam not in ("0", "1", "false", "true"):
        raise Refusal(400, f"cam={cam}: give cam=1 for a Grad-CAM picture, or leave it out")
    if cam in ("1", "true") and predictor.cam_model is None:
        raise Refusal(400, "cam: an exported file has no gradients; serve the best.pth it came from for Grad-CAM")
    return int(topk), cam in ("1", "true")


def check_token(request, token):
    """The token, compared in constant time: how long a wrong one takes says nothing of the right one."""
    if token is None:
        return
    sent = request.headers.get("authorization", "")
    scheme, _, value = sent.partition(" ")
    if not (scheme.lower() == "bearer" and hmac.compare_digest(value.strip().encode(), token.encode())):
        raise Refusal(401, "this server needs its token: send the header Authorization: Bearer TOKEN",
                      {"WWW-Authenticate": "Bearer"})


def who(request):
    client = f"{request.client.host}:{request.client.port}" if request.client else "?"
    return cli.printable(f"{request.method} {request.url.path} from {client}")


# ---------------------------------------------------------------------------------------------
# The app: routes of a few lines around the pieces above
# ---------------------------------------------------------------------------------------------

def make_app(predictor, batcher, token, max_upload):
    decoders = ThreadPoolExecutor(runtime.usable_cpus(), thread_name_prefix="decode")

    @contextlib.asynccontextmanager
    async def lifespan(app):
        batcher.start()
        yield
        batcher.stop()
        decoders.shutdown()

    app = fastapi.FastAPI(lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    with open(PAGE, encoding="utf-8") as f:
        page = f.read()

    @app.get("/")
    async def show_page():
        return HTMLResponse(page, headers={"Content-Security-Policy": PAGE_POLICY, "X-Content-Type-Options": "nosniff"})

    @app.get("/health")
    async def health():
        return {"status": "ok", "requests": batcher.inside}  # the requests being read, decoded or computed

    @app.get("/info")
    async def info(request: fastapi.Request):
        check_token(request, token)
        return predictor.describe()

    @app.post("/predict")
    async def predict_images(request: fastapi.Request):
        check_token(request, token)
        options = query_options(request.query_params, predictor)
        content_type, names = request.headers.get("content-type", ""), None

        async def read():
            nonlocal names
            body = await read_body(request, max_upload)
            images, names = await asyncio.get_running_loop().run_in_executor(
                decoders, images_of, body, content_type, predictor)
            return images

        answers = await batcher.answer(read, options)
        headers = {"X-Batch-Size": str(max(batch for _, batch in answers))}  # the largest batch they were in
        if names is None:
            return JSONResponse(answers[0][0], headers=headers)
        return JSONResponse({"results": [{"file": name, **answer} for name, (answer, _) in zip(names, answers)]},
                            headers=headers)

    @app.exception_handler(Refusal)
    async def refused(request, e):
        print(f"serve: {who(request)}: {e.status} {cli.printable(e.message)}", file=sys.stderr, flush=True)
        return JSONResponse({"error": e.message}, status_code=e.status, headers=e.headers)

    @app.exception_handler(HTTPException)
    async def no_such_page(request, e):
        return JSONResponse({"error": f"{e.detail}: this server answers GET /, /info, /health and POST /predict"},
                            status_code=e.status_code, headers=getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def failed(request, e):  # the traceback goes to the server's log (uvicorn's), never to the client
        print(f"serve: {who(request)}: 500 {cli.printable(predict_error(e))}", file=sys.stderr, flush=True)
        return JSONResponse({"error": "the server failed on this request; its log says why"}, status_code=500)

    return app


def main(args):
    # the model's threads give up the GIL in each op and need it back between ops; at Python's 5 ms
    # a thread parsing a request or decoding kept them waiting: 0.8x predict.py's folder rate at 8
    # clients, 0.9x at 0.5 ms (benchmark.py --serve, B0 at 224 px on 2 cores)
    sys.setswitchinterval(SWITCH_INTERVAL)
    token = token_of(args)
    sock = listening_socket(args.host, args.port)
    predictor = Predictor(args)
    batcher = Batcher(predictor.compute, args.max_batch, args.max_wait_ms / 1000, args.max_queue)
    app = make_app(predictor, batcher, token, int(args.max_upload_mb * 2**20))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=GRACE))
    # uvicorn stops on SIGINT and SIGTERM (no new connections, the requests in flight answered), then
    # raises the signal again with the handlers it found: these, which let the script end with 0. A
    # signal before uvicorn listens for its own, or a SIGHUP (a closed terminal), stops it the same way.
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda signum, frame: setattr(server, "should_exit", True))
    sock.listen(2048)
    names = predictor.names
    print(cli.printable(f"serving {title(predictor.info['variant'])} ({len(names)} classes: {', '.join(names[:5])}"
                        f"{' ...' if len(names) > 5 else ''}; {predictor.transform.crop} px; {predictor.device}) at "
                        f"{address_of(sock)}" + (" (a token required)" if token else "") + " (Ctrl-C stops)"),
          flush=True)
    server.run(sockets=[sock])
    print("serve: stopped", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    args = get_args_parser().parse_args()
    cli.speak_any_file_name()
    cli.quiet_warnings()
    try:
        check_args(args)
        sys.exit(main(args))
    except (UsageError, WeightsError) as e:  # DataError too (a class_indices.json): a UsageError
        print(f"error: {cli.printable(str(e))}", file=sys.stderr)
        sys.exit(2)
