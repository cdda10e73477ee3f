"""The evaluation report: ``report/report.json``, ``report/index.html`` and its PNGs.

``cpgan-eval`` scores generated, real and untrained-generator images side by side so every
number has its floor and ceiling beside it (paper §4 reports IS and R-precision; FID and SOA
are the field's later standard). This module turns those numbers and a few example images into
files a reader can open anywhere: the HTML is self-contained (inline CSS, no script, no remote
resource) and its pictures are PNGs beside it, referenced by relative ``src``, so the folder
can be copied or attached as it is.

Pictures: sample grids with their captions (generated, real, untrained), the per-word attention
maps of G1 and G2 for a few captions (F^att of Eq. 13, what each stage looked at for each word),
the region crops that built the memory of a few words (Eq. 7, Figure 3 of the paper, drawn by
:func:`cpgan.pipeline.memory.draw_memory`) and the training curves of ``metrics.jsonl``.

Everything is written atomically; ``index.html`` is written after every PNG it references, so
an index that exists never points at a missing picture. The module is torch-free: images come
in as uint8 ``[N, H, W, 3]`` arrays.
"""
from __future__ import annotations

import html
import json
import math
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from cpgan.errors import CpganError
from cpgan.pipeline.artifacts import atomic_write, atomic_write_text

REPORT_DIR = "report"
REPORT_JSON = "report.json"
INDEX_HTML = "index.html"
METRICS_LOG = "metrics.jsonl"
BLOCKS = ("untrained", "generated", "real")
"""Column order of the metrics table: floor, the model, ceiling."""
CAPTION_WIDTH = 28
"""Characters per caption line under a tile of TILE_INCHES at CAPTION_POINTS."""
TILE_INCHES = 1.6
CAPTION_POINTS = 7
LINE_POINTS = 8.5
OVERLAY_ALPHA = 0.65
DPI = 100
MAX_CURVES = 8
MEMORY_WORDS = 4


@dataclass
class AttentionExample:
    """One caption's generated image and its per-word attention maps, one ``[W, s, s]`` array
    per attentional stage (G1, G2), W the caption's real words."""

    caption: str
    words: list[str]
    image: np.ndarray
    stages: list[np.ndarray]


@dataclass
class Showcase:
    """Example images for the report, uint8 ``[K, H, W, 3]``, in caption order."""

    captions: list[str]
    generated: np.ndarray
    real: np.ndarray
    untrained: np.ndarray
    attention: list[AttentionExample] = field(default_factory=list)


@dataclass
class Picture:
    """A PNG written beside index.html, with its heading and a line about what it shows."""

    name: str
    title: str
    note: str = ""


# --------------------------------------------------------------------------------------------
# Figures


def _figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height))
    FigureCanvasAgg(figure)
    return figure


def save_figure(figure: Any, path: Path, tight: bool = True) -> None:
    """PNG at a fixed dpi, atomically (the same figure gives the same bytes)."""
    with atomic_write(path) as tmp:
        figure.savefig(tmp, format="png", dpi=DPI, bbox_inches="tight" if tight else None,
                       metadata={"Software": None})


def _wrap(text: str, width: int = CAPTION_WIDTH) -> str:
    return "\n".join(textwrap.wrap(text, width)) or text


def draw_mosaic(tiles: np.ndarray, columns: int, out: Path,
                captions: Sequence[str] | None = None,
                row_captions: Sequence[str] | None = None) -> None:
    """Equal-size uint8 tiles ``[N, H, W, 3]`` laid out ``columns`` wide, with a caption under
    each tile or one under each row, as one PNG.

    The tiles are pasted into one canvas shown by a single ``imshow`` (one axes, not one per
    tile: matplotlib spends ~50 ms on every axes, which made the report's pictures cost more
    than the evaluation), with white bands under the rows sized for the wrapped captions.
    """
    count, height, width = tiles.shape[:3]
    rows = math.ceil(count / columns)
    if captions is not None and len(captions) != count:
        raise ValueError(f"{len(captions)} captions for {count} tiles")
    if row_captions is not None and len(row_captions) != rows:
        raise ValueError(f"{len(row_captions)} row captions for {rows} rows")
    gap = max(2, width // 16)
    pitch_x = width + gap
    tile_inches = max(TILE_INCHES, pitch_x / DPI)  # never shrink large images
    chars = int(CAPTION_WIDTH * tile_inches / TILE_INCHES)
    wrapped = [_wrap(c, chars) for c in captions] if captions is not None else \
        [_wrap(c, chars * columns) for c in row_captions or []]
    lines = max((w.count("\n") + 1 for w in wrapped), default=0)
    pixels_per_inch = pitch_x / tile_inches
    band = math.ceil(lines * LINE_POINTS / 72 * pixels_per_inch) + gap if lines else 0
    pitch_y = height + band + gap
    canvas = np.full((rows * pitch_y, columns * pitch_x, 3), 255, np.uint8)
    for k, tile in enumerate(tiles):
        y, x = (k // columns) * pitch_y, (k % columns) * pitch_x
        canvas[y:y + height, x:x + width] = tile
    figure = _figure(columns * tile_inches, columns * tile_inches * canvas.shape[0] / canvas.shape[1])
    ax = figure.add_axes((0, 0, 1, 1))
    ax.imshow(canvas, interpolation="nearest")
    ax.set_axis_off()
    for k, text in enumerate(wrapped):
        row, col = (k, 0) if captions is None else divmod(k, columns)
        x = col * pitch_x + (width / 2 if captions is not None else 0)
        ax.text(x, row * pitch_y + height + gap / 2, text, ha="center" if captions is not None
                else "left", va="top", fontsize=CAPTION_POINTS)
    save_figure(figure, out, tight=False)


def draw_samples(images: np.ndarray, captions: Sequence[str], out: Path,
                 columns: int = 4) -> None:
    """A grid of images, each with its caption written under it."""
    if len(images) == 0 or len(images) != len(captions):
        raise ValueError(f"{len(images)} images for {len(captions)} captions")
    draw_mosaic(images, min(columns, len(images)), out, captions=captions)


def draw_caption_grid(images: np.ndarray, captions: Sequence[str], per_caption: int,
                      out: Path) -> None:
    """``cpgan-sample``'s picture: one row of ``per_caption`` images per caption, the caption
    written under its row."""
    if per_caption < 1 or len(images) != len(captions) * per_caption:
        raise ValueError(f"{len(images)} images for {len(captions)} captions x {per_caption}")
    draw_mosaic(images, per_caption, out, row_captions=captions)


def attention_overlay(image: np.ndarray, attention: np.ndarray) -> np.ndarray:
    """One word's attention map (any resolution, scaled to its maximum) in the inferno
    colour map, upsampled bilinearly to the image and blended over it."""
    import cv2
    from matplotlib import colormaps

    height, width = image.shape[:2]
    scaled = attention.astype(np.float32) / max(float(attention.max()), 1e-6)
    scaled = cv2.resize(scaled, (width, height), interpolation=cv2.INTER_LINEAR)
    colour = colormaps["inferno"](np.clip(scaled, 0.0, 1.0))[..., :3]
    blended = (1 - OVERLAY_ALPHA) * image.astype(np.float32) / 255 + OVERLAY_ALPHA * colour
    return np.round(blended * 255).astype(np.uint8)


def draw_attention(example: AttentionExample, out: Path) -> None:
    """One row per attentional stage (G1, G2): the generated image, then per word where that
    stage's F^att put its weight (Eq. 13), over the image."""
    tiles, captions = [], []
    for stage, maps in enumerate(example.stages, start=1):
        if maps.shape[0] != len(example.words):
            raise ValueError(f"{maps.shape[0]} attention maps for {len(example.words)} words")
        tiles.append(example.image)
        captions.append(f"G{stage} ({maps.shape[-1]}x{maps.shape[-2]})")
        for word, attention in zip(example.words, maps):
            tiles.append(attention_overlay(example.image, attention))
            captions.append(word)
    draw_mosaic(np.stack(tiles), len(example.words) + 1, out, captions=captions)


def read_metrics_log(path: Path) -> tuple[list[dict[str, Any]], int]:
    """The training log's rows that are JSON objects with a numeric ``step``, in file order,
    and how many lines were not (a line cut by a kill, say); a missing file gives no rows."""
    rows, bad = [], 0
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return [], 0
    except (OSError, UnicodeDecodeError) as exc:
        raise CpganError(f"{path}: unreadable training log ({exc})") from None
    for line in lines:
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            bad += 1
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), (int, float)):
            rows.append(row)
        else:
            bad += 1
    return rows, bad


def curve_series(rows: Sequence[dict[str, Any]]) -> dict[str, tuple[list[float], list[float]]]:
    """Every numeric column but step and epoch, as (steps, values), losses first."""
    series: dict[str, tuple[list[float], list[float]]] = {}
    for row in rows:
        for key, value in row.items():
            if key in ("step", "epoch") or isinstance(value, bool) or \
                    not isinstance(value, (int, float)) or not math.isfinite(value):
                continue
            steps, values = series.setdefault(key, ([], []))
            steps.append(float(row["step"]))
            values.append(float(value))
    order = sorted(series, key=lambda k: (not k.startswith("loss"), k))
    return {key: series[key] for key in order[:MAX_CURVES]}


def draw_curves(series: dict[str, tuple[list[float], list[float]]], out: Path) -> None:
    """One small plot per logged quantity against the optimizer step."""
    cols = min(4, len(series))
    rows = math.ceil(len(series) / cols)
    figure = _figure(3.2 * cols, 2.4 * rows)
    axes = figure.subplots(rows, cols, squeeze=False)
    for ax, (key, (steps, values)) in zip(axes.flat, series.items()):
        ax.plot(steps, values, linewidth=1.0)
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(series):]:
        ax.set_axis_off()
    figure.tight_layout()
    save_figure(figure, out)


def memory_words(root: Path, candidates: Sequence[str], limit: int = MEMORY_WORDS) -> list[str]:
    """Up to ``limit`` distinct words of ``candidates`` that have a memory (support > 0), in
    the order given (the caller lists the most telling words, category names, first)."""
    from cpgan.pipeline.memory import MEMORY_NAME, VOCAB_NAME, load_memory
    from cpgan.pipeline.text import Vocabulary

    vocab = Vocabulary.load(Path(root) / VOCAB_NAME)
    bank = load_memory(Path(root) / MEMORY_NAME, vocab)
    chosen: list[str] = []
    for word in candidates:
        word_id = vocab.id(word)
        if word not in chosen and vocab.tokens[word_id] == word and int(bank.support[word_id]):
            chosen.append(word)
        if len(chosen) == limit:
            break
    return chosen


def draw_memory_crops(root: Path, coco_root: Path, words: Sequence[str], out: Path) -> None:
    """The region crops that built each word's memory (memory_index.parquet's boxes cut from
    the images of the split memory.h5 was built from)."""
    import h5py

    from cpgan.pipeline.coco import CocoSplit
    from cpgan.pipeline.memory import MEMORY_NAME, draw_memory

    try:
        with h5py.File(Path(root) / MEMORY_NAME, "r") as f:
            split = str(f.attrs.get("split", "train2014"))
    except OSError:
        raise CpganError(f"{Path(root) / MEMORY_NAME}: no readable memory bank") from None
    draw_memory(root, CocoSplit.open(Path(coco_root), split), list(words), out)


# --------------------------------------------------------------------------------------------
# HTML

_STYLE = """
body { font-family: sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
table { border-collapse: collapse; margin: 1em 0; }
th, td { border: 1px solid #bbb; padding: 4px 10px; text-align: right; }
th:first-child, td:first-child { text-align: left; }
thead th { background: #eee; }
img { max-width: 100%; border: 1px solid #ddd; }
.note { color: #555; font-size: 90%; }
pre { background: #f6f6f6; padding: 1em; overflow-x: auto; font-size: 85%; }
"""

METRIC_ROWS = (
    ("inception_score", "Inception Score ({is_splits} splits)", "higher is better"),
    ("fid", "FID", "lower is better"),
    ("r_precision", "R-precision (1 true vs {distractors} random captions, {folds} folds)",
     "higher is better"),
    ("r_precision_in_batch", "R-precision in batches of {candidates} (CPGAN release)",
     "higher is better"),
    ("soa_c", "SOA-C", "higher is better"),
    ("soa_i", "SOA-I", "higher is better"),
    ("soa_no_object", "SOA images where the detector finds no object",
     "lower is better (real: near 0)"),
    ("soa_unnamed", "SOA detections of a class the caption does not name",
     "lower is better (real: what captions leave unnamed)"),
)


def format_metric(value: Any) -> str:
    """``{mean, std}`` as 'mean ± std', a number to 3 decimals, None as n/a."""
    if value is None:
        return "n/a"
    if isinstance(value, dict):
        return f"{value['mean']:.3f} ± {value['std']:.3f}"
    return f"{value:.3f}"


def metrics_table(report: dict[str, Any]) -> str:
    """The metrics as an HTML table: one row per metric, columns untrained | generated | real."""
    head = "".join(f"<th>{html.escape(block)}</th>" for block in BLOCKS)
    lines = [f"<table><thead><tr><th>metric</th>{head}<th></th></tr></thead><tbody>"]
    config = report["config"]
    sizes = {"is_splits": config.get("is_splits", "?"),
             "candidates": config.get("r_precision", {}).get("candidates", "?"),
             "folds": config.get("r_precision", {}).get("folds", "?")}
    sizes["distractors"] = (sizes["candidates"] - 1 if isinstance(sizes["candidates"], int)
                            else "?")
    for key, template, better in METRIC_ROWS:
        label = template.format(**sizes)
        cells = "".join(f"<td>{html.escape(format_metric(report[b].get(key)))}</td>"
                        for b in BLOCKS)
        lines.append(f"<tr><td>{html.escape(label)}</td>{cells}"
                     f"<td class=\"note\">{better}</td></tr>")
    images = "".join(f"<td>{report[b].get('images', '')}</td>" for b in BLOCKS)
    lines.append(f"<tr><td>images scored</td>{images}<td></td></tr></tbody></table>")
    return "\n".join(lines)


def encoders_table(rows: Sequence[dict[str, Any]]) -> str:
    """The pretrained DAMSM variants side by side (report["encoders"]): their val R-precision
    on real images, which bounds what R-precision can say about generated ones."""
    lines = ["<table><thead><tr><th>encoders</th><th>text encoder</th><th>image encoder</th>"
             "<th>epochs</th><th>R-precision</th><th>in-batch</th><th>val loss</th>"
             "<th>R-precision per epoch</th></tr></thead><tbody>"]
    for row in rows:
        if "error" in row:
            lines.append(f"<tr><td>{html.escape(row['model'])}</td>"
                         f"<td colspan=\"7\">{html.escape(row['error'])}</td></tr>")
            continue
        text = "MATE (memory)" if row["memory"] else "AttnGAN (no memory)"
        image = "OAIE (V_o + V_e)" if row["objects"] else "AttnGAN (V_e only)"
        history = ("n/a" if row.get("history") is None
                   else ", ".join(f"{value:.3f}" for value in row["history"]))
        cells = [row["model"], text, image, str(row["epochs"]),
                 format_metric(row["r_precision"]), format_metric(row["r_precision_in_batch"]),
                 format_metric(row["val_loss"]), history]
        lines.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>")
    lines.append("</tbody></table>")
    return "\n".join(lines)


def _stage_title(config: dict[str, Any]) -> str:
    """', stage 0 (8 px images, shown at 32 px)' when cpgan-eval --stage scored an earlier
    stage (its real images were shrunk to that size and back); '' for the last stage."""
    stage = config.get("stage")
    if not isinstance(stage, dict) or stage.get("size") == config.get("image_size"):
        return ""
    return (f", stage {stage.get('index')} ({stage.get('size')} px images, shown at "
            f"{config.get('image_size')} px; real images shrunk to {stage.get('size')} px)")


def render_html(report: dict[str, Any], pictures: Sequence[Picture],
                notes: Sequence[str]) -> str:
    """The whole index.html: title, metrics table, notes, pictures, the config block."""
    config = report["config"]
    run = config.get("checkpoint", {})
    title = (f"CPGAN evaluation: {run.get('run', '?')} at step {run.get('step', '?')} "
             f"(epoch {run.get('epoch', '?')})") + _stage_title(config)
    parts = [f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
             f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head><body>",
             f"<h1>{html.escape(title)}</h1>",
             f"<p class=\"note\">{html.escape(str(config.get('num_images', '?')))} val "
             f"(image, caption) pairs of {html.escape(str(config.get('split', '')))}; "
             "untrained = a freshly initialised generator of the same config (the floor), "
             "real = the val images themselves (the ceiling; their FID is one half against "
             "the other).</p>",
             metrics_table(report),
             f"<p class=\"note\">IS and FID features: "
             f"{html.escape(str(config.get('fid_network', '?')))}.</p>"]
    if report.get("encoders"):
        parts += ["<h2>Pretrained encoders (DAMSM, real val images)</h2>",
                  "<p class=\"note\">Each DAMSM variant's R-precision on the real val pairs "
                  "after pretraining (image global feature f against sentence vectors s), "
                  "read from models/damsm*.pt.</p>", encoders_table(report["encoders"])]
    parts += [f"<p class=\"note\">{html.escape(note)}</p>" for note in notes]
    for picture in pictures:
        parts.append(f"<h2>{html.escape(picture.title)}</h2>")
        if picture.note:
            parts.append(f"<p class=\"note\">{html.escape(picture.note)}</p>")
        parts.append(f"<p><img src=\"{html.escape(picture.name)}\" "
                     f"alt=\"{html.escape(picture.title)}\"></p>")
    parts.append("<h2>Configuration</h2><pre>"
                 + html.escape(json.dumps(config, indent=1, sort_keys=True)) + "</pre>")
    parts.append("</body></html>\n")
    return "\n".join(parts)


# --------------------------------------------------------------------------------------------
# The whole report


@dataclass
class ReportInputs:
    """Where the optional pictures come from: the run's training log and, for runs that use
    the memory, the artifacts root (memory.h5, memory_index.parquet) and the dataset."""

    metrics_log: Path | None = None
    memory_root: Path | None = None
    coco_root: Path | None = None
    memory_candidates: list[str] = field(default_factory=list)


def _sample_pictures(folder: Path, showcase: Showcase) -> list[Picture]:
    pictures = []
    for block, title in (("generated", "Generated (EMA generator)"),
                         ("real", "Real val images"),
                         ("untrained", "Untrained generator (same noise, same captions)")):
        name = f"samples-{block}.png"
        draw_samples(getattr(showcase, block), showcase.captions, folder / name)
        pictures.append(Picture(name, title))
    for k, example in enumerate(showcase.attention):
        name = f"attention-{k}.png"
        draw_attention(example, folder / name)
        pictures.append(Picture(name, f"Word attention of G1 and G2: \"{example.caption}\"",
                                "Each map is F^att's weight on that word at every position "
                                "of the previous stage's feature map (Eq. 13)."))
    return pictures


def _optional_pictures(folder: Path, inputs: ReportInputs,
                       notes: list[str]) -> list[Picture]:
    pictures = []
    if inputs.metrics_log is not None:
        rows, bad = read_metrics_log(inputs.metrics_log)
        series = curve_series(rows)
        if series:
            draw_curves(series, folder / "curves.png")
            pictures.append(Picture("curves.png", "Training curves",
                                    f"{len(rows)} logged steps from {inputs.metrics_log}"
                                    + (f"; {bad} unreadable lines skipped" if bad else "")))
        else:
            notes.append(f"No training curves: {inputs.metrics_log} has no logged step.")
    if inputs.memory_root is None or inputs.coco_root is None:
        notes.append("No memory crops: this run does not use the memory bank.")
        return pictures
    try:
        words = memory_words(inputs.memory_root, inputs.memory_candidates)
        if not words:
            notes.append("No memory crops: no word of the example captions has a memory.")
            return pictures
        draw_memory_crops(inputs.memory_root, inputs.coco_root, words, folder / "memory.png")
    except CpganError as exc:  # a missing index must not cost the finished evaluation
        notes.append(f"No memory crops: {exc}")
        return pictures
    pictures.append(Picture("memory.png", "Memory: the regions behind m_r (Eq. 7)",
                            "For each word, the most relevant regions whose features were "
                            "averaged into its memory, with their attention weights."))
    return pictures


def write_report(folder: Path, report: dict[str, Any], showcase: Showcase,
                 inputs: ReportInputs) -> list[Path]:
    """Write the PNGs, ``report.json`` and ``index.html`` (last) under ``folder``; return
    every file written. ``report`` holds the blocks generated / real / untrained / config."""
    missing = [key for key in (*BLOCKS, "config") if key not in report]
    if missing:
        raise ValueError(f"report lacks {missing}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    notes: list[str] = []
    pictures = _sample_pictures(folder, showcase) + _optional_pictures(folder, inputs, notes)
    atomic_write_text(folder / REPORT_JSON, json.dumps(report, indent=1, sort_keys=True) + "\n")
    atomic_write_text(folder / INDEX_HTML, render_html(report, pictures, notes))
    return [folder / p.name for p in pictures] + [folder / REPORT_JSON, folder / INDEX_HTML]
