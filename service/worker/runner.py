"""What the worker loop asks of a model runner, and the request it hands over. No torch here.

The loop (Redis, batching, progress) and the runner (one model on one device) meet only through this interface,
so the loop can be imported, read and tested without torch; `model_runner.ModelRunner` is the real implementation.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import numpy as np

    from service.contracts.manifest import ModelSpec


@dataclass(frozen=True)
class ImageRequest:
    """One image to generate; requests that agree on the pipeline-wide fields share one batched call."""

    prompt: str
    seed: int
    negative_prompt: str = ""


# on_step(step, total, seconds_since_previous_step); raising from it aborts the batch.
StepCallback = Callable[[int, int, float], None]


class Runner(Protocol):
    """One served model, loaded on one device, run one batch at a time."""

    spec: ModelSpec
    device: str

    @property
    def max_images(self) -> int | None:
        """Images per pipeline call the backend accepts (None: no limit)."""

    def run(self, requests: list[ImageRequest], *, width: int, height: int, steps: int, guidance: float,
            on_step: StepCallback | None = None) -> list[np.ndarray]:
        """One pipeline call for every request; uint8 HxWx3 arrays in request order."""
