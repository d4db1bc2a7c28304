"""Request validation against the served model: its manifest limits and its own CLIP tokenizer. No torch here.

Runs in the API before anything is queued, so a bad field is a 400 naming it and never reaches a worker. Prompt
length is counted in tokens with the model's own CLIP tokenizer, because the text encoder's limit is in tokens, not
characters. The API counts with the `tokenizers` library alone (what transformers' CLIP tokenizer runs underneath), so
its image carries neither transformers nor torch.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from pathlib import Path
from typing import Any

from service.api.errors import ApiError
from service.api.schemas import ImageGenerationRequest
from service.contracts.manifest import ModelSpec, parse_size
from service.contracts.queue import JobParams


def _tokenizer_file(source: str, subfolder: str | None, name: str) -> Path | None:
    """A file of the tokenizer folder: local, or from the hub cache / hub (huggingface_hub comes with tokenizers)."""
    if subfolder is None:
        path = Path(source) / name
        return path if path.is_file() else None
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    try:
        return Path(hf_hub_download(source, name, subfolder=subfolder))
    except EntryNotFoundError:
        return None


def _clip_bpe(vocab: Path, merges: Path, special: dict[str, Any]) -> Any:
    """CLIP's BPE tokenizer from vocab.json + merges.txt (what SD repositories ship without tokenizer.json): NFC,
    whitespace runs to one space, lower case; CLIP's word split, byte-level, `</w>` ending each word; start and end
    tokens around the text."""
    from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import BPE

    bos = str(special.get("bos_token", "<|startoftext|>"))
    eos = str(special.get("eos_token", "<|endoftext|>"))
    tokenizer = Tokenizer(BPE.from_file(str(vocab), str(merges), unk_token=str(special.get("unk_token", eos)),
                                        continuing_subword_prefix="", end_of_word_suffix="</w>"))
    tokenizer.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "),
                                                 normalizers.Lowercase()])
    words = Regex(r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+")
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(words, behavior="removed", invert=True),
                                                       pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tokenizer.add_special_tokens([bos, eos])
    bos_id, eos_id = tokenizer.token_to_id(bos), tokenizer.token_to_id(eos)
    if bos_id is None or eos_id is None:
        raise ValueError(f"vocab.json lacks the start or end token ({bos!r}, {eos!r})")
    tokenizer.post_processor = processors.RobertaProcessing((eos, eos_id), (bos, bos_id), trim_offsets=False,
                                                            add_prefix_space=False)
    return tokenizer


class PromptTokenizer:
    """Counts prompt tokens with the model's own CLIP tokenizer (the `tokenizers` library; no transformers, no torch):
    its tokenizer.json when the folder has one, else CLIP's BPE from vocab.json + merges.txt."""

    def __init__(self, spec: ModelSpec) -> None:
        from tokenizers import Tokenizer

        source, subfolder = spec.tokenizer_source()
        try:
            config_file = _tokenizer_file(source, subfolder, "tokenizer_config.json")
            config = json.loads(config_file.read_text()) if config_file else {}
            full = _tokenizer_file(source, subfolder, "tokenizer.json")
            if full is not None:
                self.tokenizer = Tokenizer.from_file(str(full))
            else:
                vocab = _tokenizer_file(source, subfolder, "vocab.json")
                merges = _tokenizer_file(source, subfolder, "merges.txt")
                if vocab is None or merges is None:
                    raise OSError("no tokenizer.json, nor vocab.json and merges.txt")
                self.tokenizer = _clip_bpe(vocab, merges, config)
        except Exception as err:  # tokenizers raises plain Exception for a malformed file
            raise RuntimeError(f"model {spec.name!r}: cannot load its CLIP tokenizer from {source!r}"
                               f"{f' (subfolder {subfolder})' if subfolder else ''}: {err}") from err
        self.tokenizer.no_truncation()
        self.tokenizer.no_padding()
        self.max_tokens = int(config.get("model_max_length", 77))

    def count(self, text: str) -> int:
        """Tokens including the start and end tokens, as the text encoder sees them."""
        return len(self.tokenizer.encode(text).ids)


def _supported_values(values: list[str]) -> str:
    quoted = [f"'{v}'" for v in values]
    if len(quoted) <= 2:
        return " and ".join(quoted)
    return ", ".join(quoted[:-1]) + f", and {quoted[-1]}"


def _resolve_size(body: ImageGenerationRequest, spec: ModelSpec) -> tuple[int, int]:
    """'auto' (or none) is the model's default; otherwise one of its sizes exactly, 'x' in either case."""
    if body.size is None or body.size.lower() == "auto":
        return parse_size(spec.defaults.size)
    if body.size.lower() not in spec.sizes:
        raise ApiError(400, f"Invalid value: {body.size!r}. Supported values are: "
                            f"{_supported_values([*spec.sizes, 'auto'])} (model {spec.name!r}).",
                       param="size", code="invalid_value")
    return parse_size(body.size.lower())


def validate_request(body: ImageGenerationRequest, spec: ModelSpec, tokenizer: PromptTokenizer) -> JobParams:
    """Apply the model's defaults and limits and draw the seed if none was given (stored with the job, so a retried
    or reclaimed job gives the same images); raises ApiError(400) naming the offending field, with OpenAI's codes."""
    width, height = _resolve_size(body, spec)
    if body.n > spec.max_n:
        raise ApiError(400, f"Invalid 'n': integer above maximum value. Expected a value <= {spec.max_n} for model "
                            f"{spec.name!r}, but got {body.n} instead.", param="n", code="integer_above_max_value")
    steps = body.num_inference_steps or spec.defaults.steps
    if steps > spec.max_steps:
        raise ApiError(400, f"Invalid 'num_inference_steps': integer above maximum value. Expected a value <= "
                            f"{spec.max_steps}, but got {steps} instead.", param="num_inference_steps",
                       code="integer_above_max_value")
    guidance = spec.defaults.guidance if body.guidance_scale is None else float(body.guidance_scale)
    low, high = spec.guidance_range
    if not low <= guidance <= high:
        side, code = ("below minimum", "decimal_below_min_value") if guidance < low else \
            ("above maximum", "decimal_above_max_value")
        raise ApiError(400, f"Invalid 'guidance_scale': number {side} value. Expected a value between {low} and "
                            f"{high}, but got {guidance} instead.", param="guidance_scale", code=code)
    for param, text in (("prompt", body.prompt), ("negative_prompt", body.negative_prompt)):
        if text and (count := tokenizer.count(text)) > tokenizer.max_tokens:
            raise ApiError(400, f"Invalid '{param}': too long. Expected at most {tokenizer.max_tokens} tokens for "
                                f"model {spec.name!r} (start and end tokens included), but got {count} instead.",
                           param=param, code="string_above_max_length")
    first_seed = body.seed if body.seed is not None else secrets.randbelow(2**32 - spec.max_n)
    return JobParams(model=spec.name, prompt=body.prompt, negative_prompt=body.negative_prompt, n=body.n,
                     width=width, height=height, steps=steps, guidance=guidance,
                     seeds=tuple(first_seed + i for i in range(body.n)), response_format=body.response_format,
                     output_format=body.output_format or "png", output_compression=body.output_compression)


def prompt_tokens(body: ImageGenerationRequest, tokenizer: PromptTokenizer) -> int:
    """The CLIP tokens of the prompt and the negative prompt (what OpenAI's `usage.input_tokens` counts here)."""
    return tokenizer.count(body.prompt) + (tokenizer.count(body.negative_prompt) if body.negative_prompt else 0)


def fingerprint(body: ImageGenerationRequest) -> str:
    """Identifies a request as sent (before defaults and random seeds), to detect a reused Idempotency-Key and to
    find the job a client's retry is about. Fields left out are the same as not sent, so adding an optional field
    to the schema does not change the fingerprint of existing requests."""
    return hashlib.sha256(body.model_dump_json(exclude={"user", "safety_identifier"}, exclude_none=True).encode()
                          ).hexdigest()
