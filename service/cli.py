"""`spo`: one command line for serving and training.

Serving commands live here; training commands are registered by `training.cli` when the training package's
dependencies are installed (the API image does not install them). Heavy imports happen inside each command.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # silence optional-dependency notices on import

def parse_size(value: str) -> tuple[int, int]:
    """argparse type for 'WxH'."""
    from .sizes import parse_size as parse

    try:
        return parse(value)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def positive_int(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {value!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {n}")
    return n


def _cmd_generate(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    model = Path(args.model)
    if not (model / "model_index.json").is_file():
        parser.error(f"argument --model: no diffusers pipeline folder at {str(model)!r} (model_index.json missing)")
    if args.lora is not None and not Path(args.lora).exists():
        parser.error(f"argument --lora: {args.lora!r} does not exist")

    import torch
    from PIL import Image

    from training.plots import image_grid

    from .pipeline import ImageRequest, generate, load_pipeline

    torch.manual_seed(0)
    pipe = load_pipeline(str(model), lora=args.lora, lora_scale=args.lora_scale, device=args.device)
    width, height = args.size if args.size else (pipe.unet.config.sample_size * pipe.vae_scale_factor,) * 2
    requests = [ImageRequest(args.prompt, args.seed + i, args.negative_prompt) for i in range(args.n)]
    images = generate(pipe, requests, steps=args.steps, guidance=args.guidance, width=width, height=height)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    picture = Image.fromarray(images[0]) if len(images) == 1 else image_grid(images, cols=min(len(images), 4))
    picture.save(out)
    print(f"wrote {out} ({len(images)} image(s), {width}x{height}, seeds {args.seed}..{args.seed + args.n - 1})")
    return 0


def _add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate images with a diffusers model folder (grid when --n > 1)")
    p.add_argument("--model", required=True, help="diffusers pipeline folder, e.g. models/spo-tiny")
    p.add_argument("--prompt", required=True)
    p.add_argument("--negative-prompt", default="")
    p.add_argument("--seed", type=int, default=0, help="seed of the first image; image i uses seed + i")
    p.add_argument("--steps", type=positive_int, default=20)
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--n", type=positive_int, default=1)
    p.add_argument("--size", type=parse_size, default=None, help="WxH, multiples of 8 (default: the model's)")
    p.add_argument("--lora", default=None, help="diffusers-format LoRA folder or file to fuse into the UNet")
    p.add_argument("--lora-scale", type=float, default=1.0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default="out.png")
    p.set_defaults(func=_cmd_generate, _parser=p)


# -- serving: `spo serve` (everything on one machine), `spo api`, `spo worker` ------------------------------------


def _port(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number, got {value!r}") from None
    if not 0 < n < 65536:
        raise argparse.ArgumentTypeError(f"must be between 1 and 65535, got {n}")
    return n


def _serving_settings(args: argparse.Namespace, parser: argparse.ArgumentParser):
    """Settings from SPO_* env, overridden by the flags given; a bad env value or manifest names its source."""
    from pydantic import ValidationError

    from .config import Settings
    from .manifest import ManifestError, load_manifest

    try:
        settings = Settings()
    except ValidationError as err:
        first = err.errors()[0]
        parser.error(f"environment variable SPO_{str(first['loc'][0]).upper()}: {first['msg']}")
    overrides = {name: getattr(args, name) for name in ("redis_url", "manifest", "device", "max_batch",
                                                        "max_wait_ms", "torch_threads")
                 if getattr(args, name, None) is not None}
    settings = settings.model_copy(update=overrides)
    try:
        manifest = load_manifest(settings.manifest)
    except ManifestError as err:
        parser.error(f"argument --manifest: {err}")
    given = getattr(args, "model", None)
    models = ([given] if isinstance(given, str) else list(given)) if given else list(settings.models)
    for name in models:
        if name not in manifest.models:
            parser.error(f"argument --model: {name!r} is not in {manifest.path} (known: {', '.join(manifest.names)})")
    return settings, manifest, models


def _require_local_weights(spec, parser: argparse.ArgumentParser) -> None:
    if spec.is_local(spec.base) and not (Path(spec.base) / "model_index.json").is_file():
        parser.error(f"argument --model: {spec.name!r} needs a diffusers folder at {spec.base} (model_index.json "
                     f"missing); train it with `spo train base` or point the manifest elsewhere")


def _cmd_serve(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from .serve import serve

    settings, manifest, models = _serving_settings(args, parser)
    models = models or manifest.names[:1]
    for name in models:
        _require_local_weights(manifest.get(name), parser)
    worker_args = []
    for flag in ("device", "max_batch", "max_wait_ms", "torch_threads"):
        if getattr(args, flag, None) is not None:
            worker_args += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    return serve(settings, models, host=args.host, port=args.port, worker_args=worker_args)


def _cmd_api(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    settings, manifest, models = _serving_settings(args, parser)
    if not settings.redis_url:
        parser.error("argument --redis-url: required (or set SPO_REDIS_URL); `spo serve` starts a private Redis")
    import uvicorn

    from .api import create_app

    app = create_app(settings.model_copy(update={"models": models}), manifest)
    uvicorn.run(app, host=args.host, port=args.port, log_level=logging.getLevelName(logging.getLogger().level).lower())
    return 0


def _cmd_worker(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    settings, manifest, models = _serving_settings(args, parser)
    if not settings.redis_url:
        parser.error("argument --redis-url: required (or set SPO_REDIS_URL); `spo serve` starts a private Redis")
    model = args.model or (settings.models[0] if settings.models else manifest.names[0])
    spec = manifest.get(model)
    _require_local_weights(spec, parser)
    from .backends import UnknownBackendError
    from .worker import run_worker

    try:
        return run_worker(settings, model, metrics_port=args.metrics_port)
    except UnknownBackendError as err:
        parser.error(f"argument --model: {err}")


def _add_serving(sub: argparse._SubParsersAction) -> None:
    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--manifest", type=Path, default=None, help="served-model manifest (env SPO_MANIFEST; "
                                                                   "default models/models.yaml)")
        p.add_argument("--redis-url", default=None, help="Redis URL (env SPO_REDIS_URL)")

    def worker_flags(p: argparse.ArgumentParser) -> None:
        p.add_argument("--device", default=None, help="override the manifest's device (env SPO_DEVICE)")
        p.add_argument("--max-batch", type=positive_int, default=None, help="images per pipeline call "
                                                                           "(env SPO_MAX_BATCH)")
        p.add_argument("--max-wait-ms", type=int, default=None, help="wait to fill a batch (env SPO_MAX_WAIT_MS)")
        p.add_argument("--torch-threads", type=positive_int, default=None, help="torch threads (env "
                                                                               "SPO_TORCH_THREADS)")

    p = sub.add_parser("serve", help="run the service on this machine: API + one worker per model (+ a private "
                                     "Redis when SPO_REDIS_URL is unset)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=_port, default=8000)
    p.add_argument("--model", action="append", default=None, help="model to serve (repeatable; default: the "
                                                                   "manifest's first, spo-tiny)")
    common(p)
    worker_flags(p)
    p.set_defaults(func=_cmd_serve, _parser=p)

    p = sub.add_parser("api", help="run the HTTP API only (needs a Redis and workers elsewhere)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=_port, default=8000)
    p.add_argument("--model", action="append", default=None, help="model to expose (repeatable; default: all)")
    common(p)
    p.set_defaults(func=_cmd_api, _parser=p)

    p = sub.add_parser("worker", help="run one worker: load a model, serve its queue until SIGTERM (drains)")
    p.add_argument("--model", default=None, help="model to serve (default: SPO_MODELS' first, else the manifest's)")
    p.add_argument("--metrics-port", type=_port, default=None, help="expose this worker's /metrics on this port")
    common(p)
    worker_flags(p)
    p.set_defaults(func=_cmd_worker, _parser=p)


def _cmd_export(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from .export import ExportError, export
    from .pipeline import ModelLoadError

    manifest = Path(args.manifest) if args.manifest else None
    if manifest is not None and not manifest.is_file():
        parser.error(f"argument --manifest: no file at {args.manifest!r}")
    try:
        path = export(args.model, args.backend, manifest_path=manifest, out=Path(args.out) if args.out else None,
                      fp16=args.fp16, max_batch=args.max_batch, sizes=args.sizes, device=args.device,
                      cache_dir=Path(args.cache) if args.cache else None)
    except (ExportError, ModelLoadError) as err:
        parser.error(str(err))
    print(f"{args.backend} artifact: {path}" + (f" (copied to {args.out})" if args.out else ""))
    return 0


def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export a served model's UNet to ONNX / build its TensorRT engine (cached)")
    p.add_argument("--model", required=True, help="a model name in the manifest, or a diffusers pipeline folder")
    p.add_argument("--backend", required=True, choices=["onnx", "tensorrt"])
    p.add_argument("--manifest", default=os.environ.get("SPO_MANIFEST", "models/models.yaml"))
    p.add_argument("--out", default=None, help="also write DIR/unet.onnx (or unet.plan) for other tools")
    p.add_argument("--fp16", action="store_true", help="fp16 weights (needs --device cuda)")
    p.add_argument("--max-batch", type=positive_int, default=None, help="images per call (UNet batch 2x: CFG)")
    p.add_argument("--sizes", nargs="+", default=None, help="allowed WxH image sizes (default: the manifest's)")
    p.add_argument("--device", default=None, help="cpu or cuda[:N] (default: the manifest's)")
    p.add_argument("--cache", default=None, help="artifact cache folder (default: SPO_ENGINE_CACHE)")
    p.set_defaults(func=_cmd_export, _parser=p)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="spo", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_generate(sub)
    _add_serving(sub)
    _add_export(sub)
    try:
        from training.cli import register as register_training
    except ImportError as err:  # the API-only install: say how to get the training commands
        missing = str(err)

        def _no_training(args, parser):
            parser.error(f"training commands need the training extra: pip install 'spo-diffusion[train]' ({missing})")

        for name in ("train", "data", "eval"):
            sub.add_parser(name, help="(needs spo-diffusion[train])").set_defaults(func=_no_training)
    else:
        register_training(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=os.environ.get("SPO_LOG_LEVEL", "INFO"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = build_parser()
    args = parser.parse_args(argv)
    # Subcommand errors should name the subcommand's own flags.
    sub_parser = getattr(args, "_parser", parser)
    return int(args.func(args, sub_parser) or 0)


if __name__ == "__main__":
    sys.exit(main())
