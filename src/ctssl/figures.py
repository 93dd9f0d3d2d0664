"""Report pictures beyond the Dice curves: what a segmentation looks like (overlays drawn from the cells' kept
predictions), and how the pretraining and fine-tuning losses went (from the runs' train_log.csv)."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # report jobs run headless (cluster nodes, CI)
import matplotlib.pyplot as plt  # noqa: E402
import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

from ctssl.evaluate import nanmean  # noqa: E402
from ctssl.io import atomic_path, read_json  # noqa: E402
from ctssl.splits import fraction_key  # noqa: E402

CT_WINDOW = (-160.0, 240.0)  # abdominal soft tissue: level 40 HU, width 400 HU
# train_log.csv columns that are not loss parts: the loop's own, and `tau` (the EMA momentum of PGL/BYOL targets).
NOT_LOSS_PARTS = {"step", "loss", "lr", "samples_per_s", "elapsed_s", "wait_s", "compute_s", "tau"}
CLASS_COLOURS = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#bfef45"]


def save_figure(fig, path: str | Path, rect: tuple[float, float, float, float] = (0, 0, 1, 1)) -> None:
    """PNG written atomically (a killed report job leaves no half-written picture); `rect`: the part of the figure
    tight_layout may fill (room for a suptitle or a legend)."""
    fig.tight_layout(rect=rect)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)


def message_figure(path: str | Path, text: str) -> None:
    """A figure that says why there is nothing to draw (the output still exists, so the DAG stays simple)."""
    fig, ax = plt.subplots(figsize=(6, 1.6))
    ax.axis("off")
    ax.text(0.5, 0.5, text, ha="center", va="center", wrap=True)
    save_figure(fig, path)


# ---- overlays ---------------------------------------------------------------------------------------------------

def _canonical(path: str | Path, dtype=np.float32) -> tuple[np.ndarray, np.ndarray]:
    """A NIfTI volume in RAS axis order (flips/permutations only), with its voxel spacing, so every view is drawn
    the same way whatever the scan's stored orientation."""
    img = nib.as_closest_canonical(nib.load(str(path)))
    return np.asarray(img.dataobj, dtype=dtype), np.asarray(img.header.get_zooms()[:3], dtype=float)


def _views(volume: np.ndarray, centre: tuple[int, int, int]) -> dict[str, np.ndarray]:
    """Axial (seen from the feet, anterior up) and coronal (seen from the front, superior up) slices through
    `centre`, in the radiological convention of CT viewers (the patient's right on the image's left), as images for
    imshow (rows top to bottom)."""
    x, y, z = centre
    mirrored = volume[::-1]  # RAS: x grows to the patient's right, which radiology shows on the left
    return {"axial": np.flipud(mirrored[:, :, z].T), "coronal": np.flipud(mirrored[:, y, :].T)}


def _aspect(spacing: np.ndarray) -> dict[str, float]:
    return {"axial": spacing[1] / spacing[0], "coronal": spacing[2] / spacing[0]}


def _largest_structure_centre(label: np.ndarray) -> tuple[int, int, int]:
    """The centroid of the foreground class with the most voxels (the volume's centre when there is none)."""
    values, counts = np.unique(label[label > 0], return_counts=True)
    if not len(values):
        return tuple(int(n) // 2 for n in label.shape)
    coords = np.argwhere(label == values[np.argmax(counts)])
    return tuple(int(round(c)) for c in coords.mean(axis=0))


def _draw(ax, image: np.ndarray, label: np.ndarray | None, aspect: float, n_classes: int, title: str) -> None:
    ax.imshow(image, cmap="gray", vmin=CT_WINDOW[0], vmax=CT_WINDOW[1], aspect=aspect, interpolation="nearest")
    if label is not None:
        cmap = ListedColormap(CLASS_COLOURS[: max(1, n_classes)])
        masked = np.ma.masked_where(label == 0, label)
        ax.imshow(masked, cmap=cmap, vmin=0.5, vmax=max(1, n_classes) + 0.5, alpha=0.45, aspect=aspect,
                  interpolation="nearest")
    ax.set_title(title, fontsize=8)
    ax.set_xticks([])
    ax.set_yticks([])


def overlay_figure(cells: Iterable[Mapping], image_path: str | Path, label_path: str | Path, case: str,
                   classes: Mapping[int, str], path: str | Path, dataset: str) -> None:
    """One test case of one dataset: CT (window 40/400 HU), its ground truth, and each init's kept prediction at the
    lowest and the highest labelled fraction, in an axial and a coronal slice through the largest structure.

    `cells`: one mapping per (init, fraction) with keys init, fraction, prediction (path) and dice (the case's mean
    foreground Dice, %). Rows: ground truth, then one per init; columns: axial and coronal, lowest and highest
    fraction."""
    image, spacing = _canonical(image_path)
    truth, _ = _canonical(label_path, dtype=np.uint8)
    centre = _largest_structure_centre(truth)
    image_views, truth_views, aspect = _views(image, centre), _views(truth, centre), _aspect(spacing)
    cells = list(cells)
    fractions = sorted({c["fraction"] for c in cells})
    columns = [("axial", fractions[0]), ("axial", fractions[-1]), ("coronal", fractions[0]), ("coronal", fractions[-1])]
    inits = list(dict.fromkeys(c["init"] for c in cells))
    n_classes = max(classes) if classes else 1
    fig, axes = plt.subplots(1 + len(inits), 4, figsize=(4 * 2.7, (1 + len(inits)) * 2.7), squeeze=False)
    for col, view in enumerate(["axial", "axial", "coronal", "coronal"]):
        shows_truth = col in (1, 3)
        _draw(axes[0][col], image_views[view], truth_views[view] if shows_truth else None, aspect[view], n_classes,
              f"{case}: {'ground truth' if shows_truth else 'CT'} ({view})")
    for row, init in enumerate(inits, start=1):
        for col, (view, fraction) in enumerate(columns):
            ax = axes[row][col]
            match = [c for c in cells if c["init"] == init and c["fraction"] == fraction]
            if not match:
                ax.axis("off")
                continue
            predicted, _ = _canonical(match[0]["prediction"], dtype=np.uint8)
            _draw(ax, image_views[view], _views(predicted, centre)[view], aspect[view], n_classes,
                  f"{init} {fraction_key(fraction)}%: Dice {match[0]['dice']:.1f}")
    handles = [Patch(color=CLASS_COLOURS[(v - 1) % len(CLASS_COLOURS)], label=name)
               for v, name in sorted(classes.items()) if v != 0]
    fig.legend(handles=handles, loc="lower center", ncol=max(1, len(handles)), fontsize=9, frameon=False)
    fig.suptitle(f"{dataset}: test case {case} (seed {cells[0]['seed']}); Dice = the case's mean foreground Dice (%)",
                 fontsize=10)
    save_figure(fig, path, rect=(0, 0.03, 1, 0.98))


def overlay_cells(metrics_files: Iterable[str | Path], dataset: str) -> tuple[str, list[dict], dict[int, str]]:
    """The fixed case (the first test case by name), seed (the lowest) and the cells to draw for one dataset: every
    init at its lowest and highest fraction, each with its kept prediction of that case."""
    metrics = [(Path(p), read_json(p)) for p in metrics_files]
    metrics = [(p, m) for p, m in metrics if m["dataset"] == dataset]
    if not metrics:
        raise ValueError(f"no cells of dataset {dataset!r} to draw")
    case = sorted(metrics[0][1]["test_cases"])[0]
    seed = min(int(m["seed"]) for _, m in metrics)
    fractions = sorted({float(m["fraction"]) for _, m in metrics})
    classes = {int(k): v for k, v in metrics[0][1]["classes"].items()}
    cells = []
    for path, m in sorted(metrics, key=lambda pm: (pm[1]["init"], float(pm[1]["fraction"]))):
        if int(m["seed"]) != seed or float(m["fraction"]) not in (fractions[0], fractions[-1]):
            continue
        scores = [np.nan if v is None else float(v) for v in m["per_case"][case].values()]
        cells.append({"init": m["init"], "fraction": float(m["fraction"]), "seed": seed,
                      "prediction": path.parent / "predictions" / f"{case}.nii.gz", "dice": 100 * nanmean(scores)})
    return case, cells, classes


# ---- training curves ----------------------------------------------------------------------------------------------

def read_train_log(path: str | Path) -> pd.DataFrame:
    """train_log.csv with its `parts` JSON column spread into one column per loss part."""
    frame = pd.read_csv(path)
    parts = pd.DataFrame([json.loads(p) if isinstance(p, str) and p else {} for p in frame["parts"]],
                         index=frame.index)
    return pd.concat([frame.drop(columns="parts"), parts], axis=1)


def _smooth(values: pd.Series, steps: int) -> pd.Series:
    """A centred rolling mean over ~2 % of the run: per-step losses of small batches are too noisy to read."""
    return values.rolling(max(1, steps // 50), min_periods=1, center=True).mean()


def pretraining_curves(logs: Iterable[str | Path], path: str | Path) -> None:
    """One panel per pretraining run (method, pool): the loss and each logged loss part against the step."""
    logs = [Path(p) for p in logs if Path(p).exists()]
    if not logs:
        message_figure(path, "no pretrained inits in this configuration: nothing was pretrained")
        return
    ncols = min(3, len(logs))
    nrows = -(-len(logs) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.4 * ncols, 3.2 * nrows), squeeze=False)
    for ax, log_path in zip(axes.flat, logs, strict=False):
        frame = read_train_log(log_path)
        steps = len(frame)
        ax.plot(frame["step"], _smooth(frame["loss"], steps), color="k", label="loss")
        for part in [c for c in frame.columns if c not in NOT_LOSS_PARTS]:
            values = pd.to_numeric(frame[part], errors="coerce")
            if values.notna().any():
                ax.plot(frame["step"], _smooth(values, steps), linestyle="--", label=part)
        ax.set_title(f"{log_path.parent.parent.name} / {log_path.parent.name}", fontsize=9)
        ax.set_xlabel("step")
        ax.set_ylabel("pretraining loss")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(logs):]:
        ax.axis("off")
    save_figure(fig, path)


def finetuning_curves(metrics_files: Iterable[str | Path], path: str | Path, colours: Mapping[str, str]) -> None:
    """Training loss per init at the lowest labelled fraction, mean ± sd over seeds, one panel per dataset (cells
    fine-tuned by ctssl; nnU-Net's cells log in nnU-Net's own format)."""
    rows = []
    for metrics_path in metrics_files:
        m = read_json(metrics_path)
        log_path = Path(metrics_path).with_name("train_log.csv")
        if m.get("engine", "ctssl") != "ctssl" or not log_path.exists():
            continue
        frame = pd.read_csv(log_path, usecols=["step", "loss"])
        rows.append(frame.assign(dataset=m["dataset"], init=m["init"], fraction=float(m["fraction"]), seed=m["seed"]))
    if not rows:
        message_figure(path, "no cells fine-tuned by ctssl's engine: nnU-Net's cells keep their own training logs")
        return
    frame = pd.concat(rows)
    lowest = frame.groupby("dataset")["fraction"].transform("min")
    frame = frame[frame["fraction"] == lowest]
    datasets = sorted(frame["dataset"].unique())
    fig, axes = plt.subplots(1, len(datasets), figsize=(4.6 * len(datasets), 3.4), squeeze=False)
    for ax, dataset in zip(axes[0], datasets, strict=True):
        sub = frame[frame["dataset"] == dataset]
        for init in [i for i in colours if i in set(sub["init"])]:
            raw = sub[sub["init"] == init].pivot_table(index="step", columns="seed", values="loss")
            curves = raw.apply(_smooth, steps=len(raw))
            mean, sd = curves.mean(axis=1), curves.std(axis=1).fillna(0.0)
            seeds = curves.shape[1]
            ax.plot(mean.index, mean, color=colours[init], label=f"{init} ({seeds} seed{'s' if seeds > 1 else ''})")
            ax.fill_between(mean.index, mean - sd, mean + sd, color=colours[init], alpha=0.2)
        ax.set_title(f"{dataset}: {fraction_key(sub['fraction'].iloc[0])}% labels", fontsize=9)
        ax.set_xlabel("step")
        ax.set_ylabel("training loss (Dice + CE)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    save_figure(fig, path)


def domain_figure(path: str | Path, real_hu: np.ndarray, profiles: Iterable[str], seed: int = 0,
                  real_spacing: float = 3.0) -> None:
    """The realism figure: the real scan (RAS, `real_spacing` mm voxels) and one generated case of each CT-like
    profile, axial (through the liver's upper half or the middle) and coronal (through the middle), window 40/400 HU,
    the radiological convention of CT viewers."""
    from ctssl.data.ctlike import synthesize_ct_case

    panels = [("real CT (TotalSegmentator example)", real_hu, np.full(3, real_spacing))]
    for profile in profiles:
        img, _, facts = synthesize_ct_case(profile, profile, seed, 0)
        canonical = nib.as_closest_canonical(img)
        panels.append((f"{profile}: {facts['phase'].replace('_', ' ')}, site {facts['site']}",
                       np.asarray(canonical.dataobj, dtype=np.float32),
                       np.asarray(canonical.header.get_zooms()[:3], dtype=float)))
    fig, axes = plt.subplots(2, len(panels), figsize=(2.9 * len(panels), 6.2), squeeze=False)
    for col, (title, volume, spacing) in enumerate(panels):
        centre = (volume.shape[0] // 2, volume.shape[1] // 2, int(volume.shape[2] * 0.75))
        views, aspect = _views(volume, centre), _aspect(spacing)
        _draw(axes[0][col], views["axial"], None, aspect["axial"], 1, title)
        _draw(axes[1][col], views["coronal"], None, aspect["coronal"], 1, "coronal")
    save_figure(fig, path)
