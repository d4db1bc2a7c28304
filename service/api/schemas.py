"""Request and response bodies of the HTTP API.

`ImageGenerationRequest` is OpenAI's images.generate body (model, prompt, n, size, response_format, user) plus the
extensions negative_prompt, seed, num_inference_steps, guidance_scale and priority. Checks that need the served
model's manifest (allowed sizes, limits, prompt tokens) live in `api.validate_request`, not here.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_SEED = 2**32 - 1
Priority = Literal["high", "normal", "low"]
JobStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]


class ImageGenerationRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(max_length=4000, description="what to draw; at most the model's tokenizer length in tokens")
    model: str | None = Field(None, description="served model id (GET /v1/models); default: the first one")
    n: int = Field(1, ge=1, strict=True, description="images to generate, 1..the model's max_n")
    size: str | None = Field(None, description="'WIDTHxHEIGHT', one of the model's sizes; default: its default")
    response_format: Literal["b64_json", "url"] = Field("b64_json", description="inline base64 PNG or a link")
    user: str | None = Field(None, max_length=256, description="accepted for OpenAI compatibility, unused")
    negative_prompt: str = Field("", max_length=4000, description="what to steer away from")
    seed: int | None = Field(None, ge=0, le=MAX_SEED, strict=True,
                             description="seed of image 0; image i uses seed + i; default: random (returned)")
    num_inference_steps: int | None = Field(None, ge=1, strict=True, description="denoising steps")
    guidance_scale: float | None = Field(None, allow_inf_nan=False, description="classifier-free guidance scale")
    priority: Priority = Field("normal", description="queue priority")

    @field_validator("prompt")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("prompt must not be empty")
        return value


class ImageData(BaseModel):
    b64_json: str | None = None
    url: str | None = None
    revised_prompt: str | None = None
    seed: int


class ImagesResponse(BaseModel):
    created: int
    data: list[ImageData]
    model: str
    seeds: list[int]
    job_id: str


class Progress(BaseModel):
    step: int
    total: int
    fraction: float


class Timings(BaseModel):
    queue_wait_s: float | None = None
    run_s: float | None = None
    inference_s: float | None = None
    total_s: float | None = None


class JobRequest(BaseModel):
    prompt: str
    negative_prompt: str
    n: int
    size: str
    num_inference_steps: int
    guidance_scale: float
    response_format: str


class ErrorInfo(BaseModel):
    type: str
    message: str


class JobView(BaseModel):
    id: str
    object: Literal["job"] = "job"
    model: str
    status: JobStatus
    priority: Priority
    created_at: float
    started_at: float | None
    finished_at: float | None
    queue_position: int | None = Field(None, description="undelivered jobs ahead of this one (queued jobs only)")
    progress: Progress
    attempts: int
    batch_size: int | None = Field(None, description="images in the pipeline call that produced the result")
    cancel_requested: bool
    timings: Timings
    seeds: list[int]
    images: list[str] = Field(description="PNG links, once succeeded")
    error: ErrorInfo | None
    request: JobRequest


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "spo-diffusion"
    kind: str
    description: str
    sizes: list[str]
    default_size: str
    default_steps: int
    default_guidance: float
    max_n: int
    max_steps: int
    guidance_range: tuple[float, float]
    max_prompt_tokens: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    type: str
    message: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail
