"""`spo`: one command line for serving and training.

Serving commands live here; the training commands are registered by `training.cli` when the training package's
dependencies are installed (the API image does not install them): this dispatch is the one place `service` reaches
into `training`. Heavy imports happen inside each command.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from service.contracts.config import Settings
    from service.contracts.manifest import Manifest, ModelSpec

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # silence optional-dependency notices on import

from service.cli_args import (  # noqa: E402
    HelpFormatter,
    image_size,
    port,
    positive_int,
    run_command,
    settings_or_error,
)


def _model_ref(value: str | None, flag: str, parser: argparse.ArgumentParser, needs: str | None = None) -> str | None:
    """A local path (made absolute) or a hub id, by the manifest's rules; a local one must hold `needs`."""
    from service.contracts.manifest import is_local_ref, resolve_ref

    if value is None:
        return None
    try:
        ref = resolve_ref(value, Path("."))
    except ValueError as err:
        parser.error(f"argument {flag}: {err}")
    if is_local_ref(value) and not Path(ref).exists():
        parser.error(f"argument {flag}: {value!r} does not exist")
    if is_local_ref(value) and needs is not None and not (Path(ref) / needs).is_file():
        parser.error(f"argument {flag}: no {needs} in {value!r}")
    return ref


def _cmd_generate(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    model = _model_ref(args.model, "--model", parser, needs="model_index.json")
    lora = _model_ref(args.lora, "--lora", parser)
    vae = _model_ref(args.vae, "--vae", parser, needs="config.json")
    assert model is not None

    import torch
    from diffusers.utils import make_image_grid
    from PIL import Image

    from service.worker.model_runner import DTYPES
    from service.worker.pipeline import ModelLoadError, generate, load_pipeline
    from service.worker.runner import ImageRequest

    torch.manual_seed(0)
    try:  # the worker's loading call, with what a manifest entry would say
        pipe = load_pipeline(model, lora=lora, lora_scale=args.lora_scale, vae=vae, dtype=DTYPES[args.dtype],
                             device=args.device, lora_weight_name=args.weight_name)
    except ModelLoadError as err:
        parser.error(f"argument --model: {err}")
    width, height = args.size if args.size else (pipe.unet.config.sample_size * pipe.vae_scale_factor,) * 2
    requests = [ImageRequest(args.prompt, args.seed + i, args.negative_prompt) for i in range(args.n)]
    images = generate(pipe, requests, steps=args.steps, guidance=args.guidance, width=width, height=height)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    pictures = [Image.fromarray(image) for image in images]
    cols = min(len(pictures), 4)
    rows = -(-len(pictures) // cols)
    blank = Image.new("RGB", pictures[0].size, "white")  # fills the last row: make_image_grid wants rows x cols
    picture = make_image_grid(pictures + [blank] * (rows * cols - len(pictures)), rows=rows, cols=cols)
    picture.save(out)
    print(f"wrote {out} ({len(images)} image(s), {width}x{height}, seeds {args.seed}..{args.seed + args.n - 1})")
    return 0


def _add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate images with a diffusers model folder (grid when --n > 1)",
                       formatter_class=HelpFormatter)
    p.add_argument("--model", required=True,
                   help="diffusers pipeline folder (models/spo-tiny) or hub id (runwayml/stable-diffusion-v1-5; "
                        "HF_HUB_OFFLINE=1 reads the cache only)")
    p.add_argument("--prompt", required=True, help="what to draw")
    p.add_argument("--negative-prompt", default="", help="what to steer away from (classifier-free guidance)")
    p.add_argument("--seed", type=int, default=0, help="seed of the first image; image i uses seed + i")
    p.add_argument("--steps", type=positive_int, default=20, help="denoising steps")
    p.add_argument("--guidance", type=float, default=5.0, help="classifier-free guidance scale")
    p.add_argument("--n", type=positive_int, default=1, help="images to generate")
    p.add_argument("--size", type=image_size, default=None, help="WxH, multiples of 8 (default: the model's)")
    p.add_argument("--lora", default=None, help="diffusers-format LoRA folder, file or hub id to fuse into the UNet")
    p.add_argument("--weight-name", default=None,
                   help="the LoRA's file inside --lora when not pytorch_lora_weights.safetensors (the published SPO "
                        "LoRAs: spo-sd-v1-5_4k-p_10ep_lora_diffusers.safetensors)")
    p.add_argument("--lora-scale", type=float, default=1.0, help="strength of the fused LoRA")
    p.add_argument("--vae", default=None, help="VAE folder or hub id replacing the pipeline's "
                                               "(SDXL in float16: madebyollin/sdxl-vae-fp16-fix)")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32",
                   help="weights' dtype (float16 / bfloat16 on GPU)")
    p.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:1, ...")
    p.add_argument("--out", default="out.png", help="PNG to write (a grid when --n > 1)")
    p.set_defaults(func=_cmd_generate, _parser=p)


# -- serving: `spo serve` (everything on one machine), `spo api`, `spo worker` ------------------------------------


def _serving_settings(args: argparse.Namespace,
                      parser: argparse.ArgumentParser) -> tuple[Settings, Manifest, list[str]]:
    """Settings from SPO_* env, overridden by the flags given; a bad env value or manifest names its source."""
    from service.contracts.manifest import ManifestError, load_manifest

    settings = settings_or_error(parser)
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


def _require_local_weights(spec: ModelSpec, parser: argparse.ArgumentParser) -> None:
    from service.contracts.manifest import is_local_ref

    if is_local_ref(spec.base) and not (Path(spec.base) / "model_index.json").is_file():
        parser.error(f"argument --model: {spec.name!r} needs a diffusers folder at {spec.base} (model_index.json "
                     f"missing); train it with `spo train base` or point the manifest elsewhere")


def _cmd_serve(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from service.serve import serve

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
    from service.api.app import create_app
    from service.api.server import run_api
    from service.contracts.config import ConfigError

    settings = settings.model_copy(update={"models": models})
    try:
        app = create_app(settings, manifest)
    except ConfigError as err:
        parser.error(str(err))
    run_api(app, settings, host=args.host, port=args.port,
            log_level=logging.getLevelName(logging.getLogger().level).lower())
    return 0


def _cmd_worker(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    settings, manifest, models = _serving_settings(args, parser)
    if not settings.redis_url:
        parser.error("argument --redis-url: required (or set SPO_REDIS_URL); `spo serve` starts a private Redis")
    model = args.model or (settings.models[0] if settings.models else manifest.names[0])
    spec = manifest.get(model)
    _require_local_weights(spec, parser)
    from service.worker.backends import UnknownBackendError
    from service.worker.loop import run_worker

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
                                     "Redis when SPO_REDIS_URL is unset)", formatter_class=HelpFormatter)
    p.add_argument("--host", default="127.0.0.1", help="address the API listens on")
    p.add_argument("--port", type=port, default=8000, help="port the API listens on")
    p.add_argument("--model", action="append", default=None, help="model to serve (repeatable; default: the "
                                                                   "manifest's first, spo-tiny)")
    common(p)
    worker_flags(p)
    p.set_defaults(func=_cmd_serve, _parser=p)

    p = sub.add_parser("api", help="run the HTTP API only (needs a Redis and workers elsewhere)",
                       formatter_class=HelpFormatter)
    p.add_argument("--host", default="127.0.0.1", help="address the API listens on")
    p.add_argument("--port", type=port, default=8000, help="port the API listens on")
    p.add_argument("--model", action="append", default=None, help="model to expose (repeatable; default: all)")
    common(p)
    p.set_defaults(func=_cmd_api, _parser=p)

    p = sub.add_parser("worker", help="run one worker: load a model, serve its queue until SIGTERM (drains)",
                       formatter_class=HelpFormatter)
    p.add_argument("--model", default=None, help="model to serve (default: SPO_MODELS' first, else the manifest's)")
    p.add_argument("--metrics-port", type=port, default=None, help="expose this worker's /metrics on this port")
    common(p)
    worker_flags(p)
    p.set_defaults(func=_cmd_worker, _parser=p)


def _cmd_export(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from service.worker.export import ExportError, export
    from service.worker.pipeline import ModelLoadError

    manifest = args.manifest or settings_or_error(parser).manifest
    if not manifest.is_file():
        parser.error(f"argument --manifest: no file at {str(manifest)!r}")
    try:
        path = export(args.model, args.backend, manifest_path=manifest, out=Path(args.out) if args.out else None,
                      fp16=args.fp16, max_batch=args.max_batch, sizes=args.sizes, device=args.device,
                      cache_dir=Path(args.cache) if args.cache else None)
    except (ExportError, ModelLoadError) as err:
        parser.error(str(err))
    print(f"{args.backend} artifact: {path}" + (f" (copied to {args.out})" if args.out else ""))
    return 0


def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export a served model's UNet to ONNX / build its TensorRT engine (cached)",
                       formatter_class=HelpFormatter)
    p.add_argument("--model", required=True, help="a model name in the manifest, or a diffusers pipeline folder")
    p.add_argument("--backend", required=True, choices=["onnxruntime", "tensorrt"],
                   help="the manifest backend to build for: onnxruntime (the ONNX file) or tensorrt (its engine)")
    p.add_argument("--manifest", type=Path, default=None, help="served-model manifest (env SPO_MANIFEST; default "
                                                               "models/models.yaml)")
    p.add_argument("--out", default=None, help="also write DIR/unet.onnx (or unet.plan) for other tools")
    p.add_argument("--fp16", action="store_true", help="fp16 weights (needs --device cuda)")
    p.add_argument("--max-batch", type=positive_int, default=None, help="images per call (UNet batch 2x: CFG)")
    p.add_argument("--sizes", nargs="+", default=None, help="allowed WxH image sizes (default: the manifest's)")
    p.add_argument("--device", default=None, help="cpu or cuda[:N] (default: the manifest's)")
    p.add_argument("--cache", default=None, help="artifact cache folder (default: SPO_ENGINE_CACHE)")
    p.set_defaults(func=_cmd_export, _parser=p)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="spo", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_generate(sub)
    _add_serving(sub)
    _add_export(sub)
    try:
        from training.cli import register as register_training  # the `spo` CLI dispatches to both packages
    except ImportError as err:  # the API-only install: say how to get the training commands
        missing = str(err)

        def _no_training(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
            parser.error(f"training commands need the training extra: pip install 'spo-diffusion[train]' ({missing})")

        for name in ("train", "data", "eval", "convert"):
            sub.add_parser(name, help="(needs spo-diffusion[train])").set_defaults(func=_no_training)
    else:
        register_training(sub)
    return parser


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("spo-diffusion")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


def main(argv: list[str] | None = None) -> int:
    return run_command(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
