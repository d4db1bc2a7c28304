"""Request validation against the served model: its manifest limits and its own CLIP tokenizer. No torch here.

Runs in the API before anything is queued, so a bad field is a 400 naming it and never reaches a worker. Prompt
length is counted in tokens with the model's tokenizer (transformers' tokenizers backend), because the text encoder's
limit is in tokens, not characters.
"""

from __future__ import annotations

import hashlib
import secrets

from service.api.errors import ApiError
from service.api.schemas import ImageGenerationRequest
from service.contracts.manifest import ModelSpec, parse_size
from service.contracts.queue import JobParams


class PromptTokenizer:
    """Counts prompt tokens with the model's own CLIP tokenizer (tokenizers backend; no torch)."""

    def __init__(self, spec: ModelSpec) -> None:
        import transformers
        from transformers import CLIPTokenizer

        transformers.logging.set_verbosity_error()  # over-long prompts are our 400, not a library warning
        source, subfolder = spec.tokenizer_source()
        try:
            self.tokenizer = CLIPTokenizer.from_pretrained(source, subfolder=subfolder)
        except (OSError, ValueError) as err:
            raise RuntimeError(f"model {spec.name!r}: cannot load its CLIP tokenizer from {source!r}"
                               f"{f' (subfolder {subfolder})' if subfolder else ''}: {err}") from err
        self.max_tokens = int(self.tokenizer.model_max_length)

    def count(self, text: str) -> int:
        """Tokens including the start and end tokens, as the text encoder sees them."""
        return len(self.tokenizer(text, truncation=False).input_ids)


def validate_request(body: ImageGenerationRequest, spec: ModelSpec, tokenizer: PromptTokenizer) -> JobParams:
    """Apply the model's defaults and limits and draw the seed if none was given (stored with the job, so a retried
    or reclaimed job gives the same images); raises ApiError(400) naming the offending field."""
    try:
        width, height = parse_size(body.size or spec.defaults.size)
    except ValueError as err:
        raise ApiError(400, str(err), param="size", code="invalid_size") from None
    size = f"{width}x{height}"
    if size not in spec.sizes:
        raise ApiError(400, f"size {size!r} is not served for model {spec.name!r}; allowed: {', '.join(spec.sizes)}",
                       param="size", code="invalid_size")
    if body.n > spec.max_n:
        raise ApiError(400, f"n must be between 1 and {spec.max_n} for model {spec.name!r}, got {body.n}",
                       param="n", code="invalid_n")
    steps = body.num_inference_steps or spec.defaults.steps
    if steps > spec.max_steps:
        raise ApiError(400, f"num_inference_steps must be between 1 and {spec.max_steps}, got {steps}",
                       param="num_inference_steps", code="invalid_steps")
    guidance = spec.defaults.guidance if body.guidance_scale is None else float(body.guidance_scale)
    low, high = spec.guidance_range
    if not low <= guidance <= high:
        raise ApiError(400, f"guidance_scale must be between {low} and {high}, got {guidance}",
                       param="guidance_scale", code="invalid_guidance")
    for param, text in (("prompt", body.prompt), ("negative_prompt", body.negative_prompt)):
        if text and (count := tokenizer.count(text)) > tokenizer.max_tokens:
            raise ApiError(400, f"{param} is {count} tokens; model {spec.name!r} accepts at most "
                                f"{tokenizer.max_tokens} (start and end tokens included)",
                           param=param, code="prompt_too_long")
    first_seed = body.seed if body.seed is not None else secrets.randbelow(2**32 - spec.max_n)
    return JobParams(model=spec.name, prompt=body.prompt, negative_prompt=body.negative_prompt, n=body.n,
                     width=width, height=height, steps=steps, guidance=guidance,
                     seeds=tuple(first_seed + i for i in range(body.n)), response_format=body.response_format)


def fingerprint(body: ImageGenerationRequest) -> str:
    """Identifies a request as sent (before defaults and random seeds), to detect a reused Idempotency-Key."""
    return hashlib.sha256(body.model_dump_json(exclude={"user"}).encode()).hexdigest()
