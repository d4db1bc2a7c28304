"""Training-side subcommands of `spo`: `data`, `train`, `eval`. Heavy imports happen inside each command."""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

for _dep in ("torch", "diffusers", "transformers", "scipy"):
    if importlib.util.find_spec(_dep) is None:
        raise ImportError(f"missing dependency {_dep!r}")


def _positive_int(value: str) -> int:
    n = int(value)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {n}")
    return n


def _cmd_data_shapes(args, parser) -> int:
    from .shapes import write_dataset

    out = write_dataset(Path(args.out), args.n, seed=args.seed, split=args.split)
    print(f"wrote {args.n} images and metadata.jsonl to {out}")
    return 0


def _cmd_train_base(args, parser) -> int:
    from .train_base import PRESETS, train_base

    if args.preset not in PRESETS:
        parser.error(f"argument --preset: choose from {sorted(PRESETS)}")
    if args.vae is not None and not (Path(args.vae) / "config.json").is_file():
        parser.error(f"argument --vae: no AutoencoderKL folder at {args.vae!r} (config.json missing)")
    out = train_base(args.preset, Path(args.out), seed=args.seed, vae_from=Path(args.vae) if args.vae else None)
    print(f"saved diffusers pipeline to {out}")
    return 0


def _cmd_eval_base(args, parser) -> int:
    from .evaluate import evaluate_base

    if not (Path(args.model) / "model_index.json").is_file():
        parser.error(f"argument --model: no diffusers pipeline folder at {args.model!r}")
    summary = evaluate_base(Path(args.model), Path(args.out), n_train=args.n_train, n_heldout=args.n_heldout,
                            steps=args.steps, guidance=args.guidance)
    print((Path(args.out) / "report.md").read_text())
    print(json.dumps(summary, indent=1))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    data = sub.add_parser("data", help="build datasets").add_subparsers(dest="data_command", required=True)
    p = data.add_parser("shapes", help="write shapes-world images + metadata.jsonl")
    p.add_argument("--out", required=True)
    p.add_argument("--n", type=_positive_int, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--split", choices=["train", "heldout", "all"], default="train",
                   help="which (colour, shape, background) combinations to draw from")
    p.set_defaults(func=_cmd_data_shapes, _parser=p)

    train = sub.add_parser("train", help="train models").add_subparsers(dest="train_command", required=True)
    p = train.add_parser("base", help="train spo-tiny (or its SDXL twin) from scratch on the shapes world")
    p.add_argument("--preset", default="tiny", help="tiny | tiny-xl | smoke | smoke-xl")
    p.add_argument("--out", default="runs/spo-tiny")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vae", default=None, help="reuse a trained AutoencoderKL folder instead of training one")
    p.set_defaults(func=_cmd_train_base, _parser=p)

    ev = sub.add_parser("eval", help="evaluate models").add_subparsers(dest="eval_command", required=True)
    p = ev.add_parser("base", help="rate a base model's images on training and held-out combinations")
    p.add_argument("--model", default="models/spo-tiny")
    p.add_argument("--out", default="runs/eval-base")
    p.add_argument("--n-train", type=_positive_int, default=240)
    p.add_argument("--n-heldout", type=_positive_int, default=200)
    p.add_argument("--steps", type=_positive_int, default=20)
    p.add_argument("--guidance", type=float, default=5.0)
    p.set_defaults(func=_cmd_eval_base, _parser=p)
