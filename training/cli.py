"""Training-side subcommands of `spo`: `data`, `train`, `eval`. Heavy imports happen inside each command.

`spo` registers these (`register`); `main` runs them without the serving commands: several processes start a
trainer with `accelerate launch -m training.cli train spo ...` (likewise `train spm`, `train dpo`).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from collections.abc import Callable
from pathlib import Path

from service.cli_args import HelpFormatter, float_list, int_list, positive_float, positive_int, run_command

from .presets import BASE_PRESETS, DPO_PRESETS, SPM_PRESETS, SPO_PRESETS

for _dep in ("torch", "diffusers", "transformers", "scipy"):
    if importlib.util.find_spec(_dep) is None:
        raise ImportError(f"missing dependency {_dep!r}")


def _cmd_data_shapes(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from .shapes import write_dataset

    out = write_dataset(Path(args.out), args.n, seed=args.seed, split=args.split)
    print(f"wrote {args.n} images and metadata.jsonl to {out}")
    return 0


def _cmd_train_base(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from .train_base import train_base

    if args.vae is not None and not (Path(args.vae) / "config.json").is_file():
        parser.error(f"argument --vae: no AutoencoderKL folder at {args.vae!r} (config.json missing)")
    out = train_base(args.preset, Path(args.out), seed=args.seed, vae_from=Path(args.vae) if args.vae else None)
    print(f"saved diffusers pipeline to {out}")
    return 0


def _check_pipeline(path: str | None, flag: str, parser: argparse.ArgumentParser) -> None:
    """A diffusers pipeline folder, or a usage error naming the flag."""
    if path is not None and not (Path(path) / "model_index.json").is_file():
        parser.error(f"argument {flag}: no diffusers pipeline folder at {path!r} (model_index.json missing)")


def _cmd_eval_base(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from .evaluate import evaluate_base

    _check_pipeline(args.model, "--model", parser)
    summary = evaluate_base(Path(args.model), Path(args.out), n_train=args.n_train, n_heldout=args.n_heldout,
                            steps=args.steps, guidance=args.guidance)
    print((Path(args.out) / "report.md").read_text())
    print(json.dumps(summary, indent=1))
    return 0


def _check_label_flags(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    if args.temperature < 0:
        parser.error(f"argument --temperature: must be >= 0, got {args.temperature}")
    if args.tie_rate < 0:
        parser.error(f"argument --tie-rate: must be >= 0, got {args.tie_rate}")


def _pair_flags(p: argparse.ArgumentParser) -> None:
    """What every writer of labelled pairs takes."""
    p.add_argument("--n", type=positive_int, required=True, help="number of pairs")
    p.add_argument("--out", required=True, help="folder for the parquet shards (an interrupted run resumes)")
    p.add_argument("--temperature", type=float, default=0.005,
                   help="Bradley-Terry temperature T: P(image_0 wins) = sigmoid((total_0 - total_1) / T); "
                        "0 = noiseless")
    p.add_argument("--tie-rate", type=float, default=0.0, help="Davidson tie parameter nu (0: no ties)")
    p.add_argument("--seed", type=int, default=0, help="seed of the prompts, pair seeds and label noise")
    p.add_argument("--split", choices=["train", "heldout", "all"], default="train",
                   help="which (colour, shape, background) combinations the prompts come from")


def _cmd_data_pairs(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from .preference_data import write_pairs

    _check_pipeline(args.model, "--model", parser)
    _check_label_flags(args, parser)
    if any(g < 0 for g in args.guidance):
        parser.error(f"argument --guidance: scales must be >= 0, got {args.guidance}")
    summary = write_pairs(args.model, args.out, args.n, temperature=args.temperature, seed=args.seed,
                          split=args.split, tie_rate=args.tie_rate, steps=args.steps, guidance=args.guidance,
                          batch=args.batch, device=args.device)
    print(json.dumps(summary, indent=1))
    return 0


def _cmd_data_step_pairs(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from .step_pairs import NUM_STEPS, write_step_pairs

    _check_pipeline(args.model, "--model", parser)
    _check_label_flags(args, parser)
    if not 0 <= args.first_step < NUM_STEPS:
        parser.error(f"argument --first-step: must be in [0, {NUM_STEPS}), got {args.first_step}")
    summary = write_step_pairs(args.model, args.out, args.n, temperature=args.temperature, seed=args.seed,
                               split=args.split, tie_rate=args.tie_rate, first_step=args.first_step,
                               batch=args.batch, device=args.device)
    print(json.dumps(summary, indent=1))
    return 0


def _cmd_data_renders(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from .render_pairs import write_render_pairs

    _check_label_flags(args, parser)
    summary = write_render_pairs(args.out, args.n, temperature=args.temperature, seed=args.seed, split=args.split,
                                 tie_rate=args.tie_rate)
    print(json.dumps(summary, indent=1))
    return 0


def _check_fresh_out(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """A run without --resume must not start over an earlier run's checkpoints (a later resume would mix them)."""
    from .run import CHECKPOINTS, checkpoints

    if not args.resume and checkpoints(Path(args.out) / CHECKPOINTS):
        parser.error(f"argument --out: {args.out!r} holds checkpoints of an earlier run; continue it with --resume "
                     f"or choose another folder")


def _check_data_model(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """The flags every preference trainer shares: --data (a folder of pairs), --model (a pipeline)."""
    if not Path(args.data).is_dir():
        parser.error(f"argument --data: no folder at {args.data!r}")
    _check_pipeline(args.model, "--model", parser)


def _cmd_train_spm(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from .train_spm import train_spm

    _check_data_model(args, parser)
    _check_fresh_out(args, parser)
    if args.init is not None and not (Path(args.init) / "config.json").is_file():
        parser.error(f"argument --init: no CLIP / PickScore checkpoint folder at {args.init!r} (config.json missing)")
    if args.eval_data is not None and not Path(args.eval_data).is_dir():
        parser.error(f"argument --eval-data: no folder at {args.eval_data!r}")
    if SPM_PRESETS[args.preset].clip != "tiny" and args.init is None and args.tokenizer is None:
        parser.error("argument --init: the sd15/sdxl presets start from a PickScore / CLIP ViT-H/14 folder")
    overrides = {k: v for k, v in (("steps", args.steps), ("batch_size", args.batch_size),
                                   ("micro_batch", args.micro_batch), ("lr", args.lr), ("warmup", args.warmup),
                                   ("eval_every", args.eval_every), ("save_every", args.save_every),
                                   ("eval_pairs", args.eval_pairs)) if v is not None}
    out = train_spm(args.data, args.model, args.out, args.preset, init=args.init, tokenizer=args.tokenizer,
                    eval_data=args.eval_data, time_conditioning=not args.no_time_conditioning, seed=args.seed,
                    resume=args.resume, stop_after=args.stop_after, overrides=overrides,
                    max_minutes=args.max_minutes, clean_images=args.clean_images)
    print(f"saved the step-aware preference model to {out}")
    return 0


def _cmd_eval_spm(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from .evaluate_spm import evaluate_spm

    for flag, value in (("--model", args.model), ("--ablation", args.ablation)):
        if value is not None and not (Path(value) / "spm_config.json").is_file():
            parser.error(f"argument {flag}: no SPM folder at {value!r} (spm_config.json missing)")
    _check_pipeline(args.base_model, "--base-model", parser)
    if args.step_pairs and (tuple(args.guidance) != (5.0,) or tuple(args.steps) != (20,)):
        parser.error("argument --step-pairs: step pairs are made at SPO's sampler setting (20 steps, CFG 5); "
                     "drop --guidance / --steps")
    summary = evaluate_spm(args.model, ablation=args.ablation, base_model=args.base_model, n_pairs=args.pairs,
                           seed=args.seed, guidance=args.guidance, steps=args.steps, step_pairs=args.step_pairs,
                           json_path=args.json, device=args.device)
    print(f"pairwise accuracy against the rater's noiseless preference on {summary['pairs']} fresh held-out "
          f"{'step pairs' if args.step_pairs else 'pairs'} "
          f"({summary['clear_pairs']} with a clear preference, rater gap >= {summary['clear_gap']:g}; "
          f"{summary['rater_ties_left_out']} rater ties left out):")
    print(summary["table"])
    return 0


def _read_prompt_file(path: str | None, parser: argparse.ArgumentParser) -> list[str] | None:
    """The prompts of --prompts FILE, skipped entries reported on stderr; a file with none is a usage error."""
    if path is None:
        return None
    from .prompts import PromptFileError, read_prompts

    try:
        found = read_prompts(Path(path))
    except PromptFileError as err:
        parser.error(f"argument --prompts: {err}")
    if found.problems:
        print(f"warning: --prompts {found.report()}", file=sys.stderr)
    return found.prompts


def _check_spm_folder(spm: str | None, parser: argparse.ArgumentParser) -> None:
    if spm is not None and Path(spm).is_file():
        parser.error(f"argument --spm: {spm!r} is a file; a published step-aware preference model file is converted "
                     f"first: spo convert spm --ckpt {spm} --base PICKSCORE --processor CLIP_PROCESSOR --out DIR")
    if spm is None or not (Path(spm) / "spm_config.json").is_file():
        parser.error("argument --spm: a step-aware preference model folder (spm_config.json) is required with "
                     "--scorer spm (`spo train spm`, or `spo convert spm` for a published file)")


def _cmd_train_spo(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from .train_spo import train_spo

    _check_pipeline(args.model, "--model", parser)
    _check_fresh_out(args, parser)
    if args.scorer == "spm":
        _check_spm_folder(args.spm, parser)
    prompts = _read_prompt_file(args.prompts, parser)
    overrides = {k: v for k, v in (("lr", args.lr), ("num_candidates", args.num_candidates),
                                   ("continue_from", args.continue_from)) if v is not None}
    if args.vae_fp32:
        overrides["vae_fp32"] = True
    out = train_spo(args.preset, Path(args.model), Path(args.out), spm=Path(args.spm) if args.spm else None,
                    scorer=args.scorer, prompts=prompts, seed=args.seed, full_unet=args.full_unet, resume=args.resume,
                    max_batches=args.max_batches, max_minutes=args.max_minutes, snapshot_every=args.snapshot_every or 0,
                    vae=args.vae, overrides=overrides)
    print(f"saved the SPO fine-tune and its manifest entry to {out}")
    return 0


def _cmd_train_dpo(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from .train_dpo import train_dpo

    _check_data_model(args, parser)
    _check_fresh_out(args, parser)
    batch = args.batch_size or DPO_PRESETS[args.preset].batch_size
    if args.micro_batch is not None and args.micro_batch > batch:
        parser.error(f"argument --micro-batch: {args.micro_batch} is larger than the batch size {batch}")
    if args.caption_dropout is not None and not 0.0 <= args.caption_dropout <= 1.0:
        parser.error(f"argument --caption-dropout: must be in [0, 1], got {args.caption_dropout}")
    overrides = {k: v for k, v in (("steps", args.steps), ("beta", args.beta), ("lr", args.lr),
                                   ("batch_size", args.batch_size), ("micro_batch", args.micro_batch),
                                   ("eval_every", args.eval_every), ("save_every", args.save_every),
                                   ("caption_dropout", args.caption_dropout)) if v is not None}
    out = train_dpo(args.preset, args.data, args.model, args.out, seed=args.seed, resume=args.resume,
                    max_minutes=args.max_minutes, stop_after=args.stop_after, snapshot_every=args.snapshot_every or 0,
                    overrides=overrides)
    if (out / "pytorch_lora_weights.safetensors").is_file():
        print(f"saved the Diffusion-DPO LoRA and its manifest entry to {out}")
    else:
        print(f"stopped with a checkpoint in {out / 'checkpoints'}: continue with --resume")
    return 0


def _cmd_eval_compare(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from .evaluate import evaluate_models, evaluate_prompts, load_preference_model

    models: dict[str, tuple[str, str | None]] = {}
    for item in args.models:
        name, _, ref = item.partition("=")
        base, _, lora = ref.partition("+")
        if not name or not (Path(base) / "model_index.json").is_file():
            parser.error(f"argument --models: expected NAME=PIPELINE_DIR[+LORA_DIR], got {item!r}")
        if lora and not Path(lora).exists():
            parser.error(f"argument --models: LoRA {lora!r} does not exist")
        models[name] = (base, lora or None)
    if args.prompts is not None or args.preference_model is not None:
        if args.prompts is None or args.preference_model is None:
            parser.error("argument --preference-model: --prompts and --preference-model go together (the shapes "
                         "world's rater judges only its own captions)")
        if not (Path(args.preference_model) / "config.json").is_file():
            parser.error(f"argument --preference-model: no CLIP / PickScore or SPM folder at "
                         f"{args.preference_model!r} (config.json missing)")
        prompts = _read_prompt_file(args.prompts, parser)
        assert prompts is not None
        try:
            scorer = load_preference_model(args.preference_model, args.processor)
        except (OSError, ValueError) as err:
            parser.error(f"argument --preference-model: {err}")
        evaluate_prompts(models, prompts, Path(args.out), scorer, seeds=args.seeds, steps=args.steps,
                         guidance=args.guidance, batch=args.batch, device=args.device,
                         scorer_name=str(args.preference_model))
        print((Path(args.out) / "report.md").read_text())
        return 0
    result = evaluate_models(models, Path(args.out), n_heldout=args.n_heldout, n_train=args.n_train,
                             steps=args.steps, guidance=args.guidance)
    print((Path(args.out) / "report.md").read_text())
    return 0 if result else 1


def _cmd_convert_spm(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from .spm_convert import SPMConversionError, convert_spm

    if not Path(args.ckpt).is_file():
        parser.error(f"argument --ckpt: no file at {args.ckpt!r}")
    try:
        out = convert_spm(Path(args.ckpt), args.base, Path(args.out), processor=args.processor)
    except SPMConversionError as err:
        message = str(err)
        flag = message.split(" ", 1)[0] if message.startswith("--") else "--ckpt"
        parser.error(f"argument {flag}: {message.removeprefix(flag).lstrip()}")
    print(f"saved the step-aware preference model to {out} (use it with --spm {out})")
    return 0


def _add_convert(sub: argparse._SubParsersAction) -> None:
    conv = sub.add_parser("convert", help="convert published checkpoints").add_subparsers(dest="convert_command",
                                                                                        required=True)
    p = _parser(conv, "spm", "a published step-aware preference model (*_step-aware_preference_model.bin) -> an SPM "
                "folder for --spm", _cmd_convert_spm)
    p.add_argument("--ckpt", required=True, help="the published .bin (a `model.`-prefixed fp32 state dict)")
    p.add_argument("--base", required=True,
                   help="CLIP model folder or hub id whose config.json fits the file (yuvalkirstain/PickScore_v1)")
    p.add_argument("--processor", default=None,
                   help="folder or hub id with the tokenizer and preprocessor_config.json "
                        "(laion/CLIP-ViT-H-14-laion2B-s32B-b79K; default: --base)")
    p.add_argument("--out", required=True, help="SPM folder to write")


def _parser(group: argparse._SubParsersAction, name: str, help: str,
            func: Callable[[argparse.Namespace, argparse.ArgumentParser], int]) -> argparse.ArgumentParser:
    p = group.add_parser(name, help=help, formatter_class=HelpFormatter)
    p.set_defaults(func=func, _parser=p)
    return p


def _preset_flag(p: argparse.ArgumentParser, presets: dict, default: str) -> None:
    p.add_argument("--preset", choices=sorted(presets), default=default,
                   help="named settings (training/presets.py): tiny* for this project's CPU models, sd15/sdxl the "
                        "reference recipes")


def _budget_flags(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in OUT/checkpoints")
    p.add_argument("--max-minutes", type=positive_float, default=None,
                   help=f"wall-clock budget: stop there and save the {what} trained so far")


def _add_data(sub: argparse._SubParsersAction) -> None:
    data = sub.add_parser("data", help="build datasets").add_subparsers(dest="data_command", required=True)
    p = _parser(data, "shapes", "write shapes-world images + metadata.jsonl", _cmd_data_shapes)
    p.add_argument("--out", required=True, help="folder to write (imagefolder layout)")
    p.add_argument("--n", type=positive_int, required=True, help="number of images")
    p.add_argument("--seed", type=int, default=0, help="seed of the world's random draws")
    p.add_argument("--split", choices=["train", "heldout", "all"], default="train",
                   help="which (colour, shape, background) combinations to draw from")
    p = _parser(data, "pairs", "write Pick-a-Pic-format preference pairs from a model's own generations",
                _cmd_data_pairs)
    p.add_argument("--model", default="models/spo-tiny", help="diffusers pipeline folder that generates the images")
    _pair_flags(p)
    p.add_argument("--steps", type=int_list, default=(20,),
                   help="DDIM steps, or a comma list from which each image draws its own (e.g. 4,6,8,12,20)")
    p.add_argument("--guidance", type=float_list, default=(5.0,),
                   help="CFG scale, or a comma list from which each image draws its own (e.g. 1,1.5,2,3,5,7.5)")
    p.add_argument("--batch", type=positive_int, default=32, help="pairs per pipeline call")
    p.add_argument("--device", default="cpu", help="torch device")
    p = _parser(data, "step-pairs", "write step-wise pairs: two candidates branched off one parent at a step of "
                "SPO's sampler, as its scorer sees them, labelled by their finished images (training/step_pairs.py)",
                _cmd_data_step_pairs)
    p.add_argument("--model", default="models/spo-tiny", help="diffusers pipeline folder that generates the images")
    _pair_flags(p)
    p.add_argument("--first-step", type=int, default=4,
                   help="earliest branch step of the 20 (SPO's divert_start_step; 4 is t = 751)")
    p.add_argument("--batch", type=positive_int, default=32, help="pairs per UNet call")
    p.add_argument("--device", default="cpu", help="torch device")
    p = _parser(data, "renders", "write generic preference pairs: shapes-world renders with drawn defects, labelled "
                "by the rater (the toy's Pick-a-Pic, to pre-train the SPM's CLIP)", _cmd_data_renders)
    _pair_flags(p)


def _add_train_base_and_spm(train: argparse._SubParsersAction) -> None:
    p = _parser(train, "base", "train spo-tiny (or its SDXL twin) from scratch on the shapes world", _cmd_train_base)
    _preset_flag(p, BASE_PRESETS, "tiny")
    p.add_argument("--out", default="runs/spo-tiny", help="diffusers pipeline folder to write")
    p.add_argument("--seed", type=int, default=0, help="training seed")
    p.add_argument("--vae", default=None, help="reuse a trained AutoencoderKL folder instead of training one")
    p = _parser(train, "spm", "train the step-aware preference model (also under `accelerate launch`)",
                _cmd_train_spm)
    p.add_argument("--data", required=True, help="folder of Pick-a-Pic-format pairs (*.parquet or *.jsonl)")
    p.add_argument("--model", default="models/spo-tiny",
                   help="the diffusion pipeline whose x0 predictions the SPM sees")
    p.add_argument("--out", default="runs/spm", help="folder for the SPM and its checkpoints")
    _preset_flag(p, SPM_PRESETS, "tiny")
    p.add_argument("--init", default=None,
                   help="CLIP / PickScore checkpoint folder to start from (sd15/sdxl: PickScore_v1; "
                        "tiny: a --clean-images run), or an SPM folder to continue (time conditioning included)")
    p.add_argument("--tokenizer", default=None, help="CLIP tokenizer folder when --init has none (PickScore_v1)")
    p.add_argument("--eval-data", default=None, help="pairs for periodic evaluation (tiny: generated when omitted)")
    p.add_argument("--no-time-conditioning", action="store_true", help="ablation: a plain CLIP scorer, t ignored")
    p.add_argument("--clean-images", action="store_true",
                   help="score the pairs' images as they are (t = 0, no diffusion pass): PickScore's own training, "
                        "the stage an SPM starts from with --init")
    p.add_argument("--seed", type=int, default=0, help="training seed")
    _budget_flags(p, "model")
    p.add_argument("--stop-after", type=positive_int, default=None, help="stop (with a checkpoint) after N steps")
    p.add_argument("--steps", type=positive_int, default=None, help="override the preset's optimizer steps")
    p.add_argument("--batch-size", type=positive_int, default=None, help="override: pairs per step, all processes")
    p.add_argument("--micro-batch", type=positive_int, default=None, help="override: pairs per process per pass")
    p.add_argument("--lr", type=float, default=None, help="override the preset's learning rate")
    p.add_argument("--warmup", type=int, default=None, help="override: linear warm-up steps")
    p.add_argument("--eval-every", type=int, default=None, help="steps between evaluations (0: never)")
    p.add_argument("--eval-pairs", type=positive_int, default=None, help="override: pairs per evaluation")
    p.add_argument("--save-every", type=positive_int, default=None, help="steps between checkpoints")


def _add_train_spo_and_dpo(train: argparse._SubParsersAction) -> None:
    p = _parser(train, "spo", "SPO fine-tuning (LoRA by default; also under `accelerate launch`)", _cmd_train_spo)
    _preset_flag(p, SPO_PRESETS, "tiny")
    p.add_argument("--model", default="models/spo-tiny", help="base diffusers pipeline folder")
    p.add_argument("--spm", default=None, help="step-aware preference model folder (spo train spm)")
    p.add_argument("--scorer", choices=["spm", "rater", "lookahead"], default="spm",
                   help="rater: the shapes-world rater on decoded x0 (a step-unaware ablation); lookahead: the rater "
                        "on each candidate finished by 4 deterministic DDIM steps (an oracle of its worth, ablation)")
    p.add_argument("--out", default="runs/spo-tiny-spo", help="folder for the LoRA, its manifest entry, checkpoints")
    p.add_argument("--prompts", default=None, metavar="FILE",
                   help="training prompts: .json list (the reference's 4k prompts), .jsonl with a 'prompt' field, or "
                        "text, one per line; bad entries are skipped and reported (default: the shapes world's "
                        "training captions, with its held-out rater evaluation)")
    p.add_argument("--vae", default=None, help="VAE folder or hub id for the previews the SPM scores (SDXL in fp16: "
                                               "madebyollin/sdxl-vae-fp16-fix)")
    p.add_argument("--vae-fp32", action="store_true",
                   help="decode the scored previews with the VAE in fp32 (an SDXL VAE without the fp16 fix)")
    p.add_argument("--seed", type=int, default=42, help="training seed (the reference's)")
    p.add_argument("--full-unet", action="store_true", help="fine-tune the whole UNet instead of a LoRA")
    _budget_flags(p, "LoRA")
    p.add_argument("--max-batches", type=positive_int, default=None, help="stop after N prompt batches")
    p.add_argument("--lr", type=positive_float, default=None, help="override the preset's learning rate")
    p.add_argument("--num-candidates", type=int, choices=range(2, 17), default=None, metavar="K",
                   help="override: candidates branched per step (2..16; the paper's K ablation)")
    p.add_argument("--continue-from", choices=["random", "winner"], default=None,
                   help="override: which candidate the step-wise resampler continues from (winner: ablation)")
    p.add_argument("--snapshot-every", type=positive_int, default=None, metavar="N",
                   help="keep the weights every N batches in OUT/snapshots/ (benchmarks/compute_to_gain.py)")
    p = _parser(train, "dpo", "Diffusion-DPO baseline: a LoRA trained on final-image pairs (also under "
                "`accelerate launch`)", _cmd_train_dpo)
    _preset_flag(p, DPO_PRESETS, "tiny")
    p.add_argument("--data", required=True, help="folder of Pick-a-Pic-format pairs (*.parquet or *.jsonl)")
    p.add_argument("--model", default="models/spo-tiny", help="base diffusers pipeline folder")
    p.add_argument("--out", default="runs/spo-tiny-dpo", help="folder for the LoRA, its manifest entry, checkpoints")
    p.add_argument("--seed", type=int, default=42, help="training seed")
    _budget_flags(p, "LoRA")
    p.add_argument("--steps", type=positive_int, default=None, help="override the preset's optimizer steps")
    p.add_argument("--stop-after", type=positive_int, default=None, help="stop (with a checkpoint) after N steps")
    p.add_argument("--beta", type=positive_float, default=None, help="override beta_dpo (reference 5000)")
    p.add_argument("--lr", type=positive_float, default=None, help="override the preset's learning rate")
    p.add_argument("--batch-size", type=positive_int, default=None, help="override: pairs per step, all processes")
    p.add_argument("--micro-batch", type=positive_int, default=None, help="override: pairs per process per pass")
    p.add_argument("--eval-every", type=int, default=None, help="steps between held-out evaluations (0: never)")
    p.add_argument("--save-every", type=positive_int, default=None, help="steps between checkpoints")
    p.add_argument("--caption-dropout", type=float, default=None,
                   help="override: share of pairs trained with the empty caption (reference 0.2; 0: conditional only)")
    p.add_argument("--snapshot-every", type=positive_int, default=None, metavar="N",
                   help="keep the LoRA every N steps in OUT/snapshots/ (benchmarks/compute_to_gain.py)")


def _generation_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--steps", type=positive_int, default=20, help="DDIM steps of the evaluation images")
    p.add_argument("--guidance", type=float, default=5.0, help="CFG scale of the evaluation images")


def _add_eval(sub: argparse._SubParsersAction) -> None:
    ev = sub.add_parser("eval", help="evaluate models").add_subparsers(dest="eval_command", required=True)
    p = _parser(ev, "compare", "the same held-out prompts x seeds through several models: rater parts, win-rates "
                "against the first, side-by-side grid", _cmd_eval_compare)
    p.add_argument("--models", nargs="+", required=True, metavar="NAME=DIR[+LORA]",
                   help="e.g. base=models/spo-tiny spo=models/spo-tiny+runs/spo-tiny-spo")
    p.add_argument("--out", default="runs/eval-compare", help="folder for the report, JSON and grids")
    p.add_argument("--n-heldout", type=positive_int, default=256, help="images from held-out combinations")
    p.add_argument("--n-train", type=int, default=0, help="images from training combinations")
    p.add_argument("--prompts", default=None, metavar="FILE",
                   help="your own prompts instead of the shapes world's (.json list, .jsonl with 'prompt', or text); "
                        "scored by --preference-model")
    p.add_argument("--preference-model", default=None, metavar="DIR",
                   help="with --prompts: a CLIP-style preference model folder (PickScore format, or an SPM at t = 0)")
    p.add_argument("--processor", default=None, metavar="DIR",
                   help="tokenizer / preprocessor folder when --preference-model has none (PickScore_v1: the "
                        "CLIP-ViT-H-14 processor)")
    p.add_argument("--seeds", type=positive_int, default=1, help="with --prompts: images (seeds) per prompt")
    p.add_argument("--batch", type=positive_int, default=8, help="with --prompts: images per pipeline call")
    p.add_argument("--device", default="cpu", help="with --prompts: torch device")
    _generation_flags(p)
    p = _parser(ev, "base", "rate a base model's images on training and held-out combinations", _cmd_eval_base)
    p.add_argument("--model", default="models/spo-tiny", help="diffusers pipeline folder")
    p.add_argument("--out", default="runs/eval-base", help="folder for the report, JSON and grids")
    p.add_argument("--n-train", type=positive_int, default=240, help="images from training combinations")
    p.add_argument("--n-heldout", type=positive_int, default=200, help="images from held-out combinations")
    _generation_flags(p)
    p = _parser(ev, "spm", "pairwise accuracy of an SPM against the rater at several denoising steps", _cmd_eval_spm)
    p.add_argument("--model", required=True, help="SPM folder written by `spo train spm`")
    p.add_argument("--ablation", default=None, help="SPM folder trained with --no-time-conditioning")
    p.add_argument("--base-model", default=None, help="diffusion pipeline (default: the one the SPM was trained with)")
    p.add_argument("--pairs", type=positive_int, default=500, help="fresh held-out pairs to generate")
    p.add_argument("--guidance", type=float_list, default=(5.0,),
                   help="CFG scale(s) of the fresh pairs' images, as for `spo data pairs`")
    p.add_argument("--steps", type=int_list, default=(20,),
                   help="DDIM step count(s) of the fresh pairs' images, as for `spo data pairs`")
    p.add_argument("--step-pairs", action="store_true",
                   help="evaluate on fresh held-out step pairs (siblings at SPO's branch steps), by their timestep")
    p.add_argument("--seed", type=int, default=4321, help="seed of the fresh pairs")
    p.add_argument("--json", default=None, help="write {\"accuracy\": {\"0\": a, ...}, ...} to this file")
    p.add_argument("--device", default="cpu", help="torch device")


def register(sub: argparse._SubParsersAction) -> None:
    """Add `data`, `train` and `eval` to a `spo` parser's subcommands."""
    _add_data(sub)
    train = sub.add_parser("train", help="train models").add_subparsers(dest="train_command", required=True)
    _add_train_base_and_spm(train)
    _add_train_spo_and_dpo(train)
    _add_eval(sub)
    _add_convert(sub)


def main(argv: list[str] | None = None) -> int:
    """Run one training-side command, e.g. `main(["train", "spo", "--preset", "tiny"])`."""
    parser = argparse.ArgumentParser(prog="spo", description="training commands of spo")
    register(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"))
    return run_command(parser, sys.argv[1:] if argv is None else argv)

if __name__ == "__main__":
    sys.exit(main())
