"""Preference pairs in the Pick-a-Pic record format: stream them from a local folder, or make them from a model.

Pick-a-Pic (Kirstain et al. 2023) stores one comparison per row: `caption`, the two images as encoded bytes in `jpg_0`
and `jpg_1`, and `label_0` / `label_1` (1/0 for a win, 0.5/0.5 for a tie). We keep those column names, so a real
Pick-a-Pic download (its parquet shards in a folder) reads exactly like the toy pairs this project generates from
spo-tiny. Folders are streamed one parquet row group at a time (a real download is ~200 GB); a record that cannot be
read is skipped and counted, never fatal. A folder of `*.jsonl` files whose lines name image files works too.

The toy pairs come from the model's own generations (same prompt, two seeds) labelled by the rater with
Bradley-Terry noise, P(image_0 preferred) = sigmoid((total_0 - total_1) / T), so that labels disagree with the rater
now and then like human labels do. The noiseless rater preference is kept in an extra column for evaluation.
"""

from __future__ import annotations

import io
import json
import math
import random
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from .rater import RATER_VERSION, rate
from .shapes import ALL_COMBOS, HELD_OUT, TRAIN_COMBOS, caption_for

if TYPE_CHECKING:

    from service.worker.pipeline import Pipeline

REQUIRED_COLUMNS = ("caption", "jpg_0", "jpg_1", "label_0", "label_1")
# Read when present: Pick-a-Pic's own filters and the toy data's noiseless preference and rater totals.
# `timestep`: the images are as SPO's sampler shows them at that step (step pairs, training/step_pairs.py).
OPTIONAL_COLUMNS = ("has_label", "are_different", "rater_preference", "rater_total_0", "rater_total_1", "timestep")
SPLITS = {"train": TRAIN_COMBOS, "heldout": HELD_OUT, "all": ALL_COMBOS}
# A rater gap |total_0 - total_1| from which a preference counts as clear (an alignment error is >= 0.083; most
# quality-only differences between two spo-tiny images are ~0.01).
CLEAR_GAP = 0.05


# ----------------------------------------------------------------------------------------------------------- records

@dataclass(frozen=True)
class PreferencePair:
    """One decoded comparison. Images are uint8 RGB (H, W, 3); labels sum to 1 (0.5 / 0.5 is a tie)."""

    caption: str
    image_0: np.ndarray
    image_1: np.ndarray
    label_0: float
    label_1: float
    reference: float | None = None  # noiseless preference for image_0 (1, 0 or 0.5) when the data carries one
    reference_gap: float | None = None  # |total_0 - total_1| of the rater: how clear the preference is
    timestep: int | None = None  # step pairs: both images are previews at this denoising step (else clean images)

    @property
    def is_tie(self) -> bool:
        return self.label_0 == self.label_1

    @property
    def preference(self) -> float:
        """What evaluation compares against: the noiseless preference if known, else the label."""
        return self.label_0 if self.reference is None else self.reference


@dataclass
class ReadStats:
    """What a reader skipped and why; printed at the end of a run so bad data is visible, not silent."""

    read: int = 0
    skipped: Counter = field(default_factory=Counter)

    def skip(self, reason: str, n: int = 1) -> None:
        self.skipped[reason] += n

    @property
    def n_skipped(self) -> int:
        return sum(self.skipped.values())

    def report(self) -> str:
        if not self.skipped:
            return f"read {self.read} pairs, skipped none"
        reasons = ", ".join(f"{k}: {v}" for k, v in sorted(self.skipped.items()))
        return f"read {self.read} pairs, skipped {self.n_skipped} ({reasons})"


def load_image(data: object, size: int | None = None) -> np.ndarray:
    """Decode image bytes to uint8 RGB; with `size`, bicubic-resize the short side to it and centre-crop a square.

    `data` may be raw bytes or a Hugging Face `datasets` Image struct ({"bytes": ..., "path": ...}).
    """
    if isinstance(data, dict):
        data = data.get("bytes")
    if not isinstance(data, bytes | bytearray | memoryview) or len(data) == 0:
        raise ValueError("no image bytes")
    with Image.open(io.BytesIO(bytes(data))) as opened:
        im = opened.convert("RGB")
        if size is not None and im.size != (size, size):
            w, h = im.size
            scale = size / min(w, h)
            nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
            im = im.resize((nw, nh), Image.Resampling.BICUBIC)
            left, top = (nw - size) // 2, (nh - size) // 2
            im = im.crop((left, top, left + size, top + size))
        return np.asarray(im, dtype=np.uint8).copy()


def encode_png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def _label(value: Any) -> float:
    x = float(value)
    if not math.isfinite(x) or not 0.0 <= x <= 1.0:
        raise ValueError(f"label out of range: {value!r}")
    return x


def row_to_pair(row: dict, image_size: int | None, stats: ReadStats, image_root: Path | None = None
                ) -> PreferencePair | None:
    """Validate one raw record; returns None (and counts the reason) when it cannot be used."""
    if row.get("has_label") is False:
        stats.skip("unlabelled")
        return None
    if row.get("are_different") is False:
        stats.skip("identical images")
        return None
    caption = row.get("caption")
    if not isinstance(caption, str) or not caption.strip():
        stats.skip("missing caption")
        return None
    try:
        label_0, label_1 = _label(row.get("label_0")), _label(row.get("label_1"))
        if abs(label_0 + label_1 - 1.0) > 1e-6:
            raise ValueError("labels do not sum to 1")
    except (TypeError, ValueError):
        stats.skip("bad label")
        return None
    images = []
    for key in ("jpg_0", "jpg_1"):
        data = row.get(key)
        try:
            if isinstance(data, str) and image_root is not None:  # jsonl: a file name relative to the jsonl file
                data = (image_root / data).read_bytes()
            images.append(load_image(data, image_size))
        except (OSError, ValueError, Image.DecompressionBombError):
            stats.skip("undecodable image")
            return None
    timestep = _finite(row.get("timestep"))
    if timestep is not None and (timestep != int(timestep) or not 0 <= timestep < 10_000):
        stats.skip("bad timestep")
        return None
    reference, gap = _finite(row.get("rater_preference")), None
    if _finite(row.get("rater_total_0")) is not None and _finite(row.get("rater_total_1")) is not None:
        gap = abs(float(row["rater_total_0"]) - float(row["rater_total_1"]))
    stats.read += 1
    return PreferencePair(caption, images[0], images[1], label_0, label_1, reference, gap,
                          None if timestep is None else int(timestep))


def _finite(value: Any) -> float | None:
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


# ----------------------------------------------------------------------------------------------------------- reading

@dataclass(frozen=True)
class _Chunk:
    """The unit of streaming: one parquet row group, or a run of lines of a jsonl file."""

    path: Path
    rows: int
    row_group: int = -1  # parquet
    offset: int = 0  # jsonl: byte offset of the first line


class PreferenceData:
    """A folder of Pick-a-Pic-format pairs (`**/*.parquet` or `**/*.jsonl`), streamed in a reproducible order.

    `stream(seed, epoch, start)` yields `(position, pair)`: `position` counts raw rows of that epoch's order up to and
    including this one, so a trainer that stores it can resume at exactly the next row (skipping whole chunks by their
    row counts without reading them). With a seed the order is shuffled: chunk order per epoch, and rows within a
    block of `mix_chunks` consecutive chunks, which bounds memory to a few row groups.
    """

    def __init__(self, root: Path | str, image_size: int | None = None, mix_chunks: int = 4,
                 jsonl_chunk_rows: int = 256) -> None:
        self.root = Path(root)
        self.image_size = image_size
        self.mix_chunks = max(1, mix_chunks)
        self.jsonl_chunk_rows = jsonl_chunk_rows
        self.stats = ReadStats()
        if not self.root.is_dir():
            raise FileNotFoundError(f"no preference data folder at {self.root}")
        self.chunks = self._index()
        if not self.chunks:
            raise FileNotFoundError(f"no readable *.parquet or *.jsonl pairs under {self.root}")

    def __len__(self) -> int:
        return sum(c.rows for c in self.chunks)

    def _index(self) -> list[_Chunk]:
        import pyarrow.parquet as pq

        chunks: list[_Chunk] = []
        for path in sorted(self.root.rglob("*.parquet")):
            try:
                f = pq.ParquetFile(path)
                meta = f.metadata
                missing = [c for c in REQUIRED_COLUMNS if c not in f.schema_arrow.names]
                if missing:
                    raise ValueError(f"missing columns {missing}")
            except Exception:  # noqa: BLE001 - any unreadable file is skipped and counted, whatever pyarrow raises
                self.stats.skip("unreadable file")
                continue
            chunks += [_Chunk(path, meta.row_group(i).num_rows, row_group=i) for i in range(meta.num_row_groups)
                       if meta.row_group(i).num_rows > 0]
        for path in sorted(self.root.rglob("*.jsonl")):
            offsets = []
            with open(path, "rb") as f:
                pos = 0
                for line in f:
                    if line.strip():
                        offsets.append(pos)
                    pos += len(line)
            step = self.jsonl_chunk_rows
            chunks += [_Chunk(path, min(step, len(offsets) - i), offset=offsets[i])
                       for i in range(0, len(offsets), step)]
        return chunks

    def _read_chunk(self, chunk: _Chunk) -> list[dict | None]:
        """Raw rows of a chunk; a row group that cannot be read becomes `rows` Nones (counted)."""
        if chunk.row_group >= 0:
            import pyarrow.parquet as pq

            try:
                f = pq.ParquetFile(chunk.path)
                names = set(f.schema_arrow.names)
                columns = [c for c in (*REQUIRED_COLUMNS, *OPTIONAL_COLUMNS) if c in names]
                return f.read_row_group(chunk.row_group, columns=columns).to_pylist()
            except Exception:  # noqa: BLE001 - corrupt pages surface as many different pyarrow errors
                self.stats.skip("unreadable row group", chunk.rows)
                return [None] * chunk.rows
        rows: list[dict | None] = []
        with open(chunk.path, "rb") as f:
            f.seek(chunk.offset)
            while len(rows) < chunk.rows:
                line = f.readline()
                if not line:
                    break
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                    rows.append(row if isinstance(row, dict) else None)
                except (json.JSONDecodeError, UnicodeDecodeError):
                    rows.append(None)
                if rows[-1] is None:
                    self.stats.skip("unreadable line")
                elif "jpg_0" not in rows[-1] and "image_0" in rows[-1]:
                    rows[-1]["jpg_0"], rows[-1]["jpg_1"] = rows[-1].get("image_0"), rows[-1].get("image_1")
        return rows + [None] * (chunk.rows - len(rows))

    def _blocks(self, seed: int | None, epoch: int) -> list[list[int]]:
        order = list(range(len(self.chunks)))
        if seed is not None:
            random.Random(f"{seed}-{epoch}").shuffle(order)
        return [order[i:i + self.mix_chunks] for i in range(0, len(order), self.mix_chunks)]

    def stream(self, seed: int | None = None, epoch: int = 0, start: int = 0) -> Iterator[tuple[int, PreferencePair]]:
        """Every readable pair once, from raw position `start` of the epoch's order (see the class docstring)."""
        position = 0
        for b, block in enumerate(self._blocks(seed, epoch)):
            size = sum(self.chunks[i].rows for i in block)
            if position + size <= start:
                position += size
                continue
            rows = [(row, self.chunks[i]) for i in block for row in self._read_chunk(self.chunks[i])]
            order = list(range(len(rows)))
            if seed is not None:
                random.Random(f"{seed}-{epoch}-{b}").shuffle(order)
            for k in order:
                position += 1
                row, chunk = rows[k]
                if position <= start or row is None:
                    continue
                image_root = chunk.path.parent if chunk.row_group < 0 else None
                pair = row_to_pair(row, self.image_size, self.stats, image_root)
                if pair is not None:
                    yield position, pair

    def column(self, name: str) -> Iterator[Any]:
        """One column's values, row by row (parquet: that column only, no image bytes read); absent -> None."""
        import pyarrow.parquet as pq

        for chunk in self.chunks:
            if chunk.row_group >= 0:
                try:
                    f = pq.ParquetFile(chunk.path)
                    if name not in f.schema_arrow.names:
                        yield from [None] * chunk.rows
                        continue
                    table = f.read_row_group(chunk.row_group, columns=[name])
                except Exception:  # noqa: BLE001 - counted when the row group is streamed
                    continue
                yield from table.column(name).to_pylist()
            else:
                for row in self._read_chunk(chunk):
                    yield row.get(name) if row is not None else None

    def captions(self) -> Iterator[str]:
        """Captions of every row."""
        return (c for c in self.column("caption") if isinstance(c, str))

    def carries_timesteps(self) -> bool:
        """Whether these are step pairs (training/step_pairs.py), read from the first row's `timestep` alone."""
        return _finite(next(self.column("timestep"), None)) is not None

    def prompt_counts(self) -> Counter:
        """Pairs per caption over the whole folder, for the 1/(pairs of its prompt) loss weights."""
        return Counter(self.captions())


class PairStream:
    """Endless epochs over a `PreferenceData`; (epoch, position) is all a checkpoint needs to continue exactly."""

    def __init__(self, data: PreferenceData, seed: int, epoch: int = 0, position: int = 0) -> None:
        self.data, self.seed, self.epoch, self.position = data, seed, epoch, position
        self._it = data.stream(seed, epoch, position)

    def next_batch(self, n: int) -> list[PreferencePair]:
        """The next `n` pairs, continuing into the next epoch (reshuffled) when this one ends."""
        batch: list[PreferencePair] = []
        empty_epochs = 0
        while len(batch) < n:
            try:
                self.position, pair = next(self._it)
                batch.append(pair)
                empty_epochs = 0
            except StopIteration:
                print(f"epoch {self.epoch}: {self.data.stats.report()}", file=sys.stderr)
                empty_epochs += 1
                if empty_epochs > 1 or (self.position == 0 and not batch):
                    raise RuntimeError(f"no readable pairs in {self.data.root}: {self.data.stats.report()}") from None
                self.epoch, self.position = self.epoch + 1, 0
                self._it = self.data.stream(self.seed, self.epoch, 0)
        return batch


def load_pairs(root: Path | str, limit: int | None = None, image_size: int | None = None
               ) -> tuple[list[PreferencePair], ReadStats]:
    """The first `limit` readable pairs of a folder in file order (for evaluation sets)."""
    data = PreferenceData(root, image_size=image_size)
    pairs = []
    for _, pair in data.stream():
        pairs.append(pair)
        if limit is not None and len(pairs) >= limit:
            break
    return pairs, data.stats


# ----------------------------------------------------------------------------------------------------------- making

@dataclass(frozen=True)
class PairPlan:
    """Everything about a toy pair that is drawn before any image exists, so a run (or its resume) is reproducible."""

    index: int
    caption: str
    seed_0: int
    seed_1: int
    u_label: float  # uniform draw that turns the Bradley-Terry probability into a label
    guidance_0: float = 5.0
    guidance_1: float = 5.0
    steps_0: int = 20
    steps_1: int = 20
    branch_step: int | None = None  # step pairs: one trajectory (seed_0) splits here, the branches' noise from seed_1


def plan_pairs(n: int, seed: int = 0, split: str = "train", guidance: tuple[float, ...] = (5.0,),
               steps: tuple[int, ...] = (20,)) -> list[PairPlan]:
    """Prompts (from the split's combinations), two seeds, the label draw and each image's CFG scale and step count.

    With several `guidance` / `steps` values each image draws its own, like Pick-a-Pic, whose two images often come
    from different models and settings: pairs then differ more often in visible quality (a smeared shape, a blurred
    edge) than two seeds of one setting do, whose differences spo-tiny's VAE round trip mostly erases.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
    rng = random.Random(f"pairs-{seed}-{split}")
    scales = random.Random(f"guidance-{seed}-{split}")  # its own stream: prompts and seeds do not depend on it
    counts = random.Random(f"steps-{seed}-{split}")  # likewise: data made with one step count is unchanged
    combos = SPLITS[split]
    plans = []
    for i in range(n):
        caption = caption_for(*rng.choice(combos))
        seed_0, seed_1 = rng.sample(range(100_000, 2**31 - 1), 2)
        u = rng.random()
        g0, g1 = scales.choice(guidance), scales.choice(guidance)
        s0, s1 = (counts.choice(steps), counts.choice(steps)) if len(steps) > 1 else (steps[0], steps[0])
        plans.append(PairPlan(i, caption, seed_0, seed_1, u, float(g0), float(g1), int(s0), int(s1)))
    return plans


def bradley_terry_labels(total_0: float, total_1: float, temperature: float, u: float,
                         tie_rate: float = 0.0) -> tuple[float, float]:
    """Noisy labels from rater totals: P(0 wins) = sigmoid((total_0 - total_1) / T) among decisive outcomes.

    With `tie_rate` = nu > 0, Davidson's (1970) extension adds ties with probability nu*sqrt(p0 p1)/(p0 + p1 +
    nu*sqrt(p0 p1)), p_i = exp(total_i / T), which leaves P(0 wins | decisive) unchanged. T = 0 is noiseless.
    """
    if temperature <= 0:
        return noiseless_preference(total_0, total_1), 1.0 - noiseless_preference(total_0, total_1)
    d = max(-50.0, min(50.0, (total_0 - total_1) / temperature))
    p0, p1, tie = 1.0 / (1.0 + math.exp(-d)), 1.0 / (1.0 + math.exp(d)), tie_rate * math.sqrt(
        1.0 / (2.0 + math.exp(d) + math.exp(-d)))  # sqrt(p0 p1) for the normalised p0 + p1 = 1
    total = p0 + p1 + tie
    if u < p0 / total:
        return 1.0, 0.0
    if u < (p0 + p1) / total:
        return 0.0, 1.0
    return 0.5, 0.5


def noiseless_preference(total_0: float, total_1: float) -> float:
    return 1.0 if total_0 > total_1 else 0.0 if total_0 < total_1 else 0.5


@dataclass(frozen=True)
class GeneratedPair:
    plan: PairPlan
    image_0: np.ndarray
    image_1: np.ndarray
    total_0: float
    total_1: float
    timestep: int | None = None  # step pairs: the images are the scorer's view at this step, the totals the finals'

    @classmethod
    def rated(cls, plan: PairPlan, image_0: np.ndarray, image_1: np.ndarray) -> GeneratedPair:
        """The pair with both images rated against the plan's caption: how every toy pair gets its totals."""
        return cls(plan, image_0, image_1, rate(image_0, plan.caption).total, rate(image_1, plan.caption).total)

    @property
    def reference(self) -> float:
        return noiseless_preference(self.total_0, self.total_1)

    def to_pair(self, temperature: float = 0.0, tie_rate: float = 0.0) -> PreferencePair:
        label_0, label_1 = bradley_terry_labels(self.total_0, self.total_1, temperature, self.plan.u_label, tie_rate)
        return PreferencePair(self.plan.caption, self.image_0, self.image_1, label_0, label_1, self.reference,
                              abs(self.total_0 - self.total_1), self.timestep)


def by_setting(plans: list[PairPlan], make: Callable[..., list], batch: int = 32
               ) -> Iterator[tuple[PairPlan, Any, Any]]:
    """(plan, output_0, output_1) for each planned pair, in plan order, where `make(requests, steps=, guidance=)`
    makes the outputs (images, latents) of `ImageRequest`s that share one CFG scale and step count.

    Those are pipeline-wide, so each call serves one setting. With mixed settings (20 of them for
    `--steps 4,6,8,12,20 --guidance 1.5,3,5,7.5`) the pairs are gathered in windows of `batch` pairs per setting,
    which keeps calls near 2 x `batch` images instead of a few.
    """
    from service.worker.runner import ImageRequest

    settings = {(p.guidance_0, p.steps_0) for p in plans} | {(p.guidance_1, p.steps_1) for p in plans}
    window = batch * max(1, min(len(settings), 32))
    for start in range(0, len(plans), window):
        chunk = plans[start:start + window]
        wanted = [(p.caption, s, (g, n)) for p in chunk
                  for s, g, n in ((p.seed_0, p.guidance_0, p.steps_0), (p.seed_1, p.guidance_1, p.steps_1))]
        outputs: list[Any] = [None] * len(wanted)
        for scale, count in sorted({w[2] for w in wanted}):
            same = [i for i, w in enumerate(wanted) if w[2] == (scale, count)]
            for k in range(0, len(same), 2 * batch):
                idx = same[k:k + 2 * batch]
                made = make([ImageRequest(wanted[i][0], wanted[i][1]) for i in idx], steps=count, guidance=scale)
                for i, output in zip(idx, made, strict=True):
                    outputs[i] = output
        for k, plan in enumerate(chunk):
            yield plan, outputs[2 * k], outputs[2 * k + 1]


def generate_pairs(pipe: Pipeline, plans: list[PairPlan], *, batch: int = 32,
                   progress: bool = True) -> Iterator[GeneratedPair]:
    """Both images of each planned pair through the service's `generate` (per-image seeds, so an image does not
    depend on its batch), rated, in plan order; calls grouped by `by_setting`."""
    from service.worker.pipeline import generate

    size = pipe.unet.config.sample_size * pipe.vae_scale_factor

    def make(requests: list[Any], *, steps: int, guidance: float) -> list[np.ndarray]:
        return generate(pipe, requests, steps=steps, guidance=guidance, width=size, height=size)

    bar = tqdm(total=len(plans), desc="pairs", unit="pair", dynamic_ncols=True, disable=not progress)
    for plan, image_0, image_1 in by_setting(plans, make, batch):
        yield GeneratedPair.rated(plan, image_0, image_1)
        bar.update(1)
    bar.close()


def _schema() -> Any:
    import pyarrow as pa

    return pa.schema([
        ("ranking_id", pa.int64()), ("caption", pa.string()), ("jpg_0", pa.binary()), ("jpg_1", pa.binary()),
        ("label_0", pa.float64()), ("label_1", pa.float64()), ("image_0_uid", pa.string()),
        ("image_1_uid", pa.string()), ("model_0", pa.string()), ("model_1", pa.string()),
        ("best_image_uid", pa.string()), ("has_label", pa.bool_()), ("are_different", pa.bool_()),
        ("num_example_per_prompt", pa.int64()),
        # Toy extras (Pick-a-Pic readers ignore unknown columns): the rater's view and how the images were made.
        ("rater_total_0", pa.float64()), ("rater_total_1", pa.float64()), ("rater_preference", pa.float64()),
        ("seed_0", pa.int64()), ("seed_1", pa.int64()), ("guidance_0", pa.float64()), ("guidance_1", pa.float64()),
        ("steps_0", pa.int64()), ("steps_1", pa.int64()), ("branch_step", pa.int64()), ("timestep", pa.int64()),
    ])


def _row(g: GeneratedPair, temperature: float, tie_rate: float, model_name: str, per_prompt: int) -> dict:
    p = g.plan

    def made_by(guidance: float, steps: int) -> str:  # renders have no CFG scale or step count
        return f"{model_name}@cfg{guidance:g}@{steps}steps" if steps else model_name

    label_0, label_1 = bradley_terry_labels(g.total_0, g.total_1, temperature, p.u_label, tie_rate)
    model_0, model_1 = made_by(p.guidance_0, p.steps_0), made_by(p.guidance_1, p.steps_1)
    if p.branch_step is None:
        uid_0, uid_1 = f"{model_0}@seed{p.seed_0}", f"{model_1}@seed{p.seed_1}"
    else:  # both branches of one trajectory: the branch noise's seed and which of its two draws
        uid_0, uid_1 = (f"{model_0}@seed{p.seed_0}@branch{p.branch_step}:{p.seed_1}/{k}" for k in (0, 1))
    best = "" if label_0 == label_1 else uid_0 if label_0 > label_1 else uid_1
    return {"ranking_id": p.index, "caption": p.caption, "jpg_0": encode_png(g.image_0), "jpg_1": encode_png(g.image_1),
            "label_0": label_0, "label_1": label_1, "image_0_uid": uid_0, "image_1_uid": uid_1,
            "model_0": model_0, "model_1": model_1, "best_image_uid": best, "has_label": True,
            "are_different": True, "num_example_per_prompt": per_prompt, "rater_total_0": g.total_0,
            "rater_total_1": g.total_1, "rater_preference": g.reference, "seed_0": p.seed_0, "seed_1": p.seed_1,
            "guidance_0": p.guidance_0, "guidance_1": p.guidance_1, "steps_0": p.steps_0, "steps_1": p.steps_1,
            "branch_step": p.branch_step, "timestep": g.timestep}


def _complete_shard(path: Path, rows: int) -> bool:
    import pyarrow.parquet as pq

    try:
        return path.is_file() and pq.ParquetFile(path).metadata.num_rows == rows
    except Exception:  # noqa: BLE001 - a half-written shard is simply written again
        return False


def write_pairs(model: Path | str, out: Path | str, n: int, *, temperature: float = 0.005, seed: int = 0,
                split: str = "train", tie_rate: float = 0.0, steps: tuple[int, ...] = (20,),
                guidance: tuple[float, ...] = (5.0,),
                batch: int = 32, shard_size: int = 4096, row_group_size: int = 256, device: str = "cpu") -> dict:
    """Generate `n` labelled pairs from a diffusers model into parquet shards at `out`; returns the summary.

    The default temperature suits spo-tiny, whose two images of one prompt differ by small rater gaps: it keeps most
    labels in agreement with the rater (measurements in benchmarks/results/spm-pickscore-cpu-2026-11-26).
    Prompts, seeds and label noise are drawn up front, so an interrupted run restarted with the same arguments
    skips its finished shards and produces exactly the same data. PNG bytes go in the `jpg_*` columns: JPEG
    artefacts would change what the rater saw on 64x64 images (any format PIL reads is accepted by the reader).
    """
    from service.worker.pipeline import load_pipeline

    pipe = None

    def make(plans: list[PairPlan]) -> Iterator[GeneratedPair]:
        nonlocal pipe
        if pipe is None:  # only when a shard is missing: a finished folder costs no model load
            pipe = load_pipeline(str(model), device=device)
        return generate_pairs(pipe, plans, batch=batch, progress=False)

    plans = plan_pairs(n, seed, split, tuple(guidance), tuple(steps))
    return write_shards(out, plans, make, model_name=Path(model).name, temperature=temperature, tie_rate=tie_rate,
                        shard_size=shard_size, row_group_size=row_group_size,
                        record=dict(model=str(model), split=split, seed=seed, steps=list(steps),
                                    guidance=list(guidance)))


def pairs_rater_version(folder: Path | str) -> int | None:
    """The rater version that labelled a folder of pairs (its info.json; folders from before versions were recorded
    are v1), or None when nothing says (no info.json yet). A folder of pair folders (training reads them all) has
    the one version its sub-folders agree on; mixed versions are refused, since they are different preferences."""
    folder = Path(folder)
    info = folder / "info.json"
    if info.is_file():
        return int(json.loads(info.read_text()).get("rater_version", 1))
    versions = {sub: pairs_rater_version(sub) for sub in sorted(folder.iterdir()) if sub.is_dir()} \
        if folder.is_dir() else {}
    known = {v for v in versions.values() if v is not None}
    if len(known) > 1:
        listed = ", ".join(f"{sub.name}: v{v}" for sub, v in versions.items() if v is not None)
        raise ValueError(f"{folder} mixes pairs labelled by different rater versions ({listed})")
    return known.pop() if known else None


def write_shards(out: Path | str, plans: list[PairPlan], make: Callable[[list[PairPlan]], Iterator[GeneratedPair]],
                 *, model_name: str, temperature: float,
                 tie_rate: float, shard_size: int = 4096, row_group_size: int = 256, record: dict | None = None
                 ) -> dict:
    """Write the pairs `make(plans_of_a_shard)` yields as labelled parquet shards (finished shards are skipped),
    then `info.json` (label statistics, speed and `record`) and `preview.png`; returns the summary."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    earlier = pairs_rater_version(out)
    if earlier not in (None, RATER_VERSION):
        raise ValueError(f"--out: {out} holds pairs labelled by rater v{earlier}; this rater is v{RATER_VERSION}, "
                         f"and one folder must not mix them: write to another folder")
    n = len(plans)
    per_prompt = Counter(p.caption for p in plans)
    n_shards = (n + shard_size - 1) // shard_size
    started = time.time()
    generated = 0
    bar = tqdm(total=n, desc="pairs", unit="pair", dynamic_ncols=True)
    for s in range(n_shards):
        shard_plans = plans[s * shard_size:(s + 1) * shard_size]
        path = out / f"pairs-{s:05d}-of-{n_shards:05d}.parquet"
        if _complete_shard(path, len(shard_plans)):
            bar.update(len(shard_plans))
            continue
        tmp = path.with_suffix(".parquet.tmp")
        with pq.ParquetWriter(tmp, _schema()) as writer:
            rows: list[dict] = []
            for g in make(shard_plans):
                bar.update(1)
                rows.append(_row(g, temperature, tie_rate, model_name, per_prompt[g.plan.caption]))
                if len(rows) == row_group_size:
                    writer.write_table(pa.Table.from_pylist(rows, schema=_schema()), row_group_size=row_group_size)
                    rows = []
            if rows:
                writer.write_table(pa.Table.from_pylist(rows, schema=_schema()), row_group_size=row_group_size)
        tmp.rename(path)
        generated += len(shard_plans)
    bar.close()
    seconds = time.time() - started
    summary = summarise_pairs(out)
    summary.update(**(record or {}), rater_version=RATER_VERSION, temperature=temperature, tie_rate=tie_rate,
                   generated_now=generated,
                   seconds=round(seconds, 1), pairs_per_second=round(generated / seconds, 3) if generated else None)
    (out / "info.json").write_text(json.dumps(summary, indent=2) + "\n")
    _save_preview(out / "preview.png", out)
    return summary


def summarise_pairs(root: Path | str) -> dict:
    """Label statistics of a toy pairs folder, read from its columns (no image decoding)."""
    import pyarrow.parquet as pq

    cols = ["label_0", "rater_total_0", "rater_total_1", "rater_preference"]
    tables = [pq.read_table(p, columns=cols) for p in sorted(Path(root).rglob("*.parquet"))]
    label = np.concatenate([t.column("label_0").to_numpy() for t in tables])
    t0 = np.concatenate([t.column("rater_total_0").to_numpy() for t in tables])
    t1 = np.concatenate([t.column("rater_total_1").to_numpy() for t in tables])
    ref = np.concatenate([t.column("rater_preference").to_numpy() for t in tables])
    decisive = (ref != 0.5) & (label != 0.5)
    gap = np.abs(t0 - t1)
    return {"pairs": int(len(label)), "ties_in_labels": int((label == 0.5).sum()),
            "rater_ties": int((ref == 0.5).sum()),
            "label_agrees_with_rater": float((label[decisive] == ref[decisive]).mean()) if decisive.any() else None,
            "rater_gap_median": float(np.median(gap)),
            "rater_gap_quartiles": [float(np.quantile(gap, q)) for q in (0.25, 0.75)],
            f"clear_pairs_gap_{CLEAR_GAP:g}": float((gap >= CLEAR_GAP).mean())}


def _save_preview(path: Path, root: Path, n: int = 8) -> None:
    """The first pairs side by side, winner (by label) on the left, for eyeballing the data."""
    from diffusers.utils import make_image_grid

    tiles: list[Image.Image] = []
    for _, pair in PreferenceData(root).stream():
        win, lose = (pair.image_0, pair.image_1) if pair.label_0 >= pair.label_1 else (pair.image_1, pair.image_0)
        tiles += [Image.fromarray(win), Image.fromarray(lose)]
        if len(tiles) >= 2 * n:
            break
    tiles += [Image.new("RGB", tiles[0].size, "white")] * (-len(tiles) % 4)  # the grid is full rows
    grid = make_image_grid(tiles, rows=len(tiles) // 4, cols=4)
    grid.resize((grid.width * 2, grid.height * 2), Image.Resampling.NEAREST).save(path)
