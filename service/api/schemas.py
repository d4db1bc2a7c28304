"""Request and response bodies of the HTTP API.

`ImageGenerationRequest` is OpenAI's images.generate body plus the extensions negative_prompt, seed,
num_inference_steps, guidance_scale and priority. Every parameter the `openai` SDK can send is known here: the
benign ones are accepted (`output_format` and `output_compression` are honoured, `size="auto"` is the model's
default; `quality`, `style`, `moderation`, `complexity`, `background="auto"|"opaque"` change nothing a diffusion model
can do and are ignored), and values this server cannot honour (`stream=true`, `background="transparent"`, gif or svg
output, ...) are refused as OpenAI does: 400 `invalid_value` naming the parameter; an unknown parameter is 400
`unknown_parameter`. Types are strict throughout (`"5"` or `true` is not a number). Checks that need the served
model's manifest (allowed sizes, limits, prompt tokens) live in `validation.validate_request`; `app.create_app`
writes those limits into the OpenAPI schema of the deployment.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator
from pydantic_core import PydanticCustomError

MAX_SEED = 2**32 - 1
Priority = Literal["high", "normal", "low"]
JobStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]
OutputFormat = Literal["png", "jpeg", "webp"]
# What OpenAI's API accepts for these, all of it accepted here (and ignored: see the module docstring).
Quality = Literal["auto", "low", "medium", "high", "xhigh", "max", "standard", "hd"]
Style = Literal["vivid", "natural"]
Moderation = Literal["auto", "low"]
Complexity = Literal["low", "medium", "high"]
Background = Literal["auto", "opaque"]  # "transparent": no alpha channel in these models' output


def _integral(value: object) -> object:
    """JSON Schema's integer: 4 or 4.0, never 4.5, "4" or true (those fail the strict int check after this)."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


# After the constraints in Annotated[int, Field(...), WHOLE], so the schema keeps them as minimum / maximum.
WHOLE = BeforeValidator(_integral)


class ImageGenerationRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: str = Field(max_length=4000, pattern=r"\S",
                        description="what to draw: not blank, at most the model's `max_prompt_tokens` CLIP tokens "
                                    "(GET /v1/models; start and end tokens included)")
    model: str | None = Field(None, description="served model id (GET /v1/models); default: the first one")
    n: Annotated[int, Field(ge=1), WHOLE] = Field(1, description="images to generate, 1..the model's max_n")
    size: str | None = Field(None, description="'WIDTHxHEIGHT', one of the model's sizes, or 'auto' (the model's "
                                               "default size)")
    response_format: Literal["b64_json", "url"] = Field("b64_json", description="inline base64 image or a link")
    output_format: OutputFormat | None = Field(None, description="image encoding (default png)")
    output_compression: Annotated[int, Field(ge=0, le=100), WHOLE] | None = Field(None,
                                           description="jpeg/webp quality in percent (100: best, the default); "
                                                       "ignored for png")
    quality: Quality | None = Field(None, description="accepted for OpenAI compatibility; every value renders the "
                                                      "same (num_inference_steps sets the work)")
    style: Style | None = Field(None, description="accepted for OpenAI compatibility, ignored")
    background: Background | None = Field(None, description="'auto' or 'opaque' (the only kind produced); "
                                                            "'transparent' is refused")
    moderation: Moderation | None = Field(None, description="accepted for OpenAI compatibility, ignored")
    complexity: Complexity | None = Field(None, description="accepted for OpenAI compatibility, ignored")
    stream: Literal[False] | None = Field(None, description="only false: streaming is not supported (follow a job's "
                                                            "progress at /v1/jobs/{id}/events)")
    partial_images: Literal[0] | None = Field(None, description="only 0: partial images need streaming")
    user: str | None = Field(None, max_length=256, description="accepted for OpenAI compatibility, unused")
    safety_identifier: str | None = Field(None, max_length=256,
                                          description="accepted for OpenAI compatibility, echoed, unused")
    # OpenAI parameters of output kinds this server does not produce: only null is accepted.
    frame_count: None = Field(None, description="gif output only: not supported (only null)")
    frame_duration_ms: None = Field(None, description="gif output only: not supported (only null)")
    svg: None = Field(None, description="svg output only: not supported (only null)")
    negative_prompt: str = Field("", max_length=4000, description="what to steer away from")
    seed: Annotated[int, Field(ge=0, le=MAX_SEED), WHOLE] | None = Field(None,
                             description="seed of image 0; image i uses seed + i; default: random (returned)")
    num_inference_steps: Annotated[int, Field(ge=1), WHOLE] | None = Field(
        None, description="denoising steps, 1..the model's max_steps")
    guidance_scale: float | None = Field(None, allow_inf_nan=False,
                                         description="classifier-free guidance scale, in the model's guidance_range")
    priority: Priority = Field("normal", description="queue priority")

    @field_validator("prompt")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("prompt must not be empty")
        return value

    @field_validator("stream", mode="before")
    @classmethod
    def _a_boolean(cls, value: object) -> object:
        if value is not None and type(value) is not bool:  # Literal[False] alone would take 0
            raise PydanticCustomError("bool_type", "Input should be a valid boolean")
        return value

    @field_validator("partial_images", mode="before")
    @classmethod
    def _an_integer(cls, value: object) -> object:
        value = _integral(value)
        if value is not None and type(value) is not int:  # Literal[0] alone would take false
            raise PydanticCustomError("int_type", "Input should be a valid integer")
        return value


class ImageData(BaseModel):
    b64_json: str | None = None
    url: str | None = None
    revised_prompt: str | None = None
    seed: int


class InputTokensDetails(BaseModel):
    text_tokens: int
    image_tokens: int = 0


class Usage(BaseModel):
    """OpenAI's usage block: the prompt's CLIP tokens (and the negative prompt's) as input; images are not counted
    in tokens here, so output_tokens is 0."""

    input_tokens: int
    input_tokens_details: InputTokensDetails
    output_tokens: int = 0
    total_tokens: int


class ImagesResponse(BaseModel):
    created: int
    data: list[ImageData]
    model: str
    seeds: list[int]
    job_id: str
    size: str = Field(description="'WIDTHxHEIGHT' of the images")
    output_format: OutputFormat
    background: Literal["opaque"] = "opaque"
    quality: str | None = Field(None, description="the quality asked for, echoed (it changes nothing)")
    safety_identifier: str | None = None
    usage: Usage | None = None


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
    output_format: str = "png"


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
    guidance_range: list[float] = Field(min_length=2, max_length=2, description="[low, high]")
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


def error_example(status: int, code: str, message: str, type: str = "invalid_request_error",
                  param: str | None = None) -> dict[str, Any]:
    return {"error": {"type": type, "message": message, "param": param, "code": code}}
