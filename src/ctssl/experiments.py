"""Kept diagnosis experiments: why pretrained inits scored below scratch, and what changes that.

Each experiment is a list of fine-tuning runs (init x fine-tuning settings x seed) on one downstream dataset at one
label fraction, with Dice on *development* cases every `curve_every` steps (training cases outside the labelled
subset: `ctssl.diagnostics.development_cases`) and the usual test-set score at the end. Decisions (which learning
rate, how long to pretrain) are read off the development column only; the test column is there to reproduce the
reported numbers and is never used to choose anything.

Everything is cached under `{results}/experiments/` (pretraining runs by method and length, fine-tuning runs by a
digest of their settings), so experiments share runs and a rerun only computes what is missing. Entry point:
`python experiments/diagnose.py EXPERIMENT [--config experiments/configs/diag.yaml]`.
"""

from __future__ import annotations

import copy
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ctssl.config import load_config, method_config, without_later_defaults
from ctssl.diagnostics import DiceCurve, activation_scales, development_cases, weight_drift, weight_norms
from ctssl.io import file_digest, json_digest, read_json, save_torch, write_json
from ctssl.models.backbone import build_backbone
from ctssl.report import bootstrap_ci, collect, paired_wilcoxon, summary_table
from ctssl.splits import holdout_splits, subset_size
from ctssl.train.common import seed_everything

CURVE_EVERY = 20  # fine-tuning steps between two dev-Dice points
DEV_CASES = 6  # development cases scored per run
SHORT = 300  # the pretraining length
LENGTHS = [0, 300, 1000, 3000]  # pretraining-length sweep (steps, separate runs)
BEST_SSL = "pgl@3000"  # the longest PGL run: what the LR and probe experiments compare
# Pretraining variants by name: (registered method, overrides of its settings).
# "hu" variants keep absolute intensity: no brightness/contrast/gamma changes between views (noise and blur stay).
HU_PRESERVING = {"contrast_prob": 0.0, "brightness_prob": 0.0, "gamma_prob": 0.0}
VARIANTS: dict[str, tuple[str, dict]] = {
    "pgl-decor": ("pgl", {"decorrelation_weight": 1.0}),
    "pgl-hu": ("pgl", {"views": {"intensity": HU_PRESERVING}}),
}


def parse_init(init: str) -> tuple[str, str, str]:
    """An experiment init 'name@steps' or 'name@steps:volumes' -> (name, steps, volumes); '' where absent."""
    name, _, length = init.partition("@")
    steps, _, volumes = length.partition(":")
    return name, steps, volumes


@dataclass(frozen=True)
class Run:
    """One fine-tuning run of an experiment. `init`: 'scratch' or '{method}@{steps}' (pretrained for that many
    steps on pool 'all'; 'method@0' is the pretraining run's own random initialisation, untrained)."""

    label: str
    init: str
    seed: int
    finetune: dict = field(default_factory=dict)  # overrides of the config's `finetune` section
    labelled: int | None = None  # labelled training cases; None: the study's fraction


class Study:
    """The data, caches and runners shared by every experiment of one config."""

    def __init__(self, config_path: str | Path, dataset: str = "liver", fraction: float = 10.0, threads: int = 1,
                 holdout: int = 0):
        """`holdout` > 0: that many training cases (a fixed draw of `split_seed`) are taken out of training for
        every run and are its development cases, so that runs with all remaining labels (100 %) have development
        cases too; otherwise a run's development cases are the training cases outside its labelled subset."""
        self.config_path = Path(config_path)
        self.cfg = load_config(config_path)
        self.root = Path(self.cfg["results"])
        self.cache = self.root / "experiments"
        self.dataset, self.fraction, self.threads, self.holdout = dataset, float(fraction), threads, int(holdout)
        self.curve_every, self.n_dev = CURVE_EVERY, DEV_CASES
        self.curve_points: int | None = None  # set: dev-Dice points per run (every steps // curve_points steps)

    # -- data ------------------------------------------------------------------------------------------------
    def ensure_data(self, cores: int = 2) -> None:
        """Preprocessed data, splits and the pool through the real workflow (nothing reruns if up to date)."""
        targets = [f"{self.root}/preprocessed/{self.dataset}", f"{self.root}/splits/{self.dataset}.json",
                   f"{self.root}/pools/all.csv"]
        cmd = [sys.executable, "-m", "snakemake", "--cores", str(cores), "--quiet", "rules",
               "--configfile", str(self.config_path), "--", *targets]
        subprocess.run(cmd, check=True, cwd=Path(__file__).resolve().parents[2])

    @property
    def preprocessed(self) -> Path:
        return self.root / "preprocessed" / self.dataset

    @property
    def workflow_splits(self) -> Path:
        return self.root / "splits" / f"{self.dataset}.json"

    @property
    def splits_path(self) -> Path:
        """The splits runs train from: the workflow's, or with `holdout` development cases taken out of training."""
        if not self.holdout:
            return self.workflow_splits
        path = self.cache / "splits" / f"{self.dataset}_holdout{self.holdout}.json"
        if not path.exists():
            write_json(path, holdout_splits(read_json(self.workflow_splits), self.holdout))
        return path

    def dev_cases(self, fraction: float, seed: int) -> list[str]:
        splits = read_json(self.splits_path)
        if self.holdout:
            return list(splits["development"])
        return development_cases(splits, fraction, seed)[: self.n_dev]

    def fraction_of(self, run: Run) -> float:
        """The label fraction of a run: the study's, or the one that labels exactly `run.labelled` cases."""
        if run.labelled is None:
            return self.fraction
        n_train = len(read_json(self.splits_path)["train"])
        if not 1 <= run.labelled <= n_train:
            raise ValueError(f"{run.labelled} labelled cases asked, {n_train} training cases available")
        return 100.0 * run.labelled / n_train  # subset_size rounds this back to exactly run.labelled

    # -- pretraining -----------------------------------------------------------------------------------------
    def pretrained(self, init: str) -> Path | None:
        """Weights for 'scratch' (None), '{method}@{steps}' (on pool 'all') or '{method}@{steps}:{volumes}' (on
        that many of pool 'all''s volumes: `pool`), trained once and cached."""
        if init == "scratch":
            return None
        name, steps, volumes = parse_init(init)
        method, overrides = VARIANTS.get(name, (name, {}))
        cfg, pool_csv = copy.deepcopy(self.cfg), self.pool(int(volumes)) if volumes else self.root / "pools" / "all.csv"
        # A nested override (views.intensity...) is merged key by key into the shared settings by method_config.
        cfg["pretrain"]["methods"][method].update(copy.deepcopy(overrides), steps=int(steps))
        mcfg = method_config(cfg["pretrain"], method)
        # Keyed by everything the weights depend on, not by name alone: a config with another network or other
        # pretraining settings must not pick up weights cached for the old one.
        pool = file_digest(pool_csv) if int(steps) else None  # an untrained start reads no image
        key = json_digest({"model": cfg["model"], "method": method, "pool": pool,  # as the workflow's params:
                           "settings": without_later_defaults(mcfg, "pretrain")})  # new settings at default: same key
        out = self.cache / "pretrain" / f"{name}-{steps}{f'-pool{volumes}' if volumes else ''}-{key[:8]}"
        weights = out / "model.pt"
        if weights.exists():
            return weights
        if int(steps) == 0:  # the untrained start of that pretraining run: same seed, same construction order
            seed_everything(int(mcfg["seed"]))
            save_torch(weights, build_backbone(cfg["model"]).state_dict())
            return weights
        from ctssl.train.pretrain import run_pretrain

        cfg["pretrain"]["checkpoint_every"] = max(int(steps), 1)
        run_pretrain(pool_csv=pool_csv, method=method, pool="all", cfg=cfg, out_dir=out, threads=self.threads)
        return weights

    def pool(self, volumes: int) -> Path:
        """A pool of `volumes` of pool 'all''s volumes (`nested_pool_order`, drawn with the pretraining seed), for
        the unlabelled-pool curve; written once under the cache (its content keys the pretraining runs)."""
        source = self.root / "pools" / "all.csv"
        frame = pd.read_csv(source, keep_default_na=False)
        if not 1 <= volumes <= len(frame):
            raise ValueError(f"a pool of {volumes} volumes asked, {source} holds {len(frame)}: raise the n_cases of "
                             f"the pool's datasets in {self.config_path} (pretrain.pool_datasets)")
        order = nested_pool_order(frame["dataset"], int(self.cfg["pretrain"]["seed"]))
        path = self.cache / "pools" / f"all-{volumes}-{file_digest(source)[:8]}.csv"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            frame.iloc[order[:volumes]].to_csv(path, index=False)
        return path

    # -- fine-tuning -----------------------------------------------------------------------------------------
    def finetune(self, run: Run) -> Path:
        """metrics.json of one run (cached by its settings); its dev-Dice curve is `curve.csv` beside it."""
        from ctssl.train.finetune import run_finetune

        settings = self._settings(run)  # once per run: it reads the splits
        cfg, weights, fraction = settings["cfg"], self.pretrained(run.init), settings["fraction"]
        out = self._run_dir(settings)
        if (out / "metrics.json").exists():
            return out / "metrics.json"
        manifest = read_json(self.preprocessed / "manifest.json")
        dev = self.dev_cases(fraction, run.seed)
        curve = DiceCurve(self.preprocessed, dev, {int(k): v for k, v in manifest["labels"].items()},
                          cfg["finetune"]["patch_size"], settings["curve_every"],
                          overlap=float(cfg["finetune"]["sw_overlap"]))
        steps = int(cfg["finetune"]["steps"])

        def on_step(step: int, net: torch.nn.Module) -> None:
            curve(step, net)
            if step == steps:  # what fine-tuning left of the init (exp_weights)
                save_torch(out / "backbone_after.pt", net.backbone.state_dict())

        run_finetune(preprocessed_dir=self.preprocessed, splits_path=self.splits_path, fraction=fraction,
                     seed=run.seed, init=run.label, init_weights=weights, cfg=cfg, out_dir=out,
                     threads=self.threads, on_step=on_step)
        pd.DataFrame(curve.rows).to_csv(out / "curve.csv", index=False)
        write_json(out / "run.json", {"label": run.label, "init": run.init, "seed": run.seed,
                                      "finetune": run.finetune, "fraction": fraction, "dev_cases": dev})
        return out / "metrics.json"


    def finetune_many(self, runs: list[Run], jobs: int = 1) -> list[Path]:
        """metrics.json of each run; the uncached ones on `jobs` processes (each with the study's threads)."""
        # Every pretraining once, here, before any fine-tuning worker could start the same one; the distinct
        # pretrainings are independent, so they share the `jobs` processes too (each writes its own folder).
        inits = list(dict.fromkeys(run.init for run in runs))
        for init in inits:  # the pool files first, in this process: two workers must not write one
            volumes = parse_init(init)[2]
            if volumes:
                self.pool(int(volumes))
        self._on_workers(self.pretrained, inits, jobs)
        # Longest first, so that the workers finish together.
        todo = sorted((run for run in runs if not self._cached(run)), key=lambda r: -int(r.finetune.get("steps", 0)))
        self._on_workers(self.finetune, todo, jobs)
        return [self.finetune(run) for run in runs]

    @staticmethod
    def _on_workers(task: Callable, items: list, jobs: int) -> None:
        """`task` over `items` on `jobs` worker processes (results are read back from the cache afterwards)."""
        if jobs > 1 and len(items) > 1:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            # spawn, not fork: a forked child of a process that has used torch's thread pool can hang.
            with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
                list(pool.map(task, items))
        else:
            for item in items:
                task(item)

    def _cached(self, run: Run) -> bool:
        return (self._run_dir(self._settings(run)) / "metrics.json").exists()

    def _settings(self, run: Run) -> dict:
        """Everything a run's result depends on: its cache key."""
        cfg = copy.deepcopy({k: self.cfg[k] for k in ("model", "finetune", "device", "amp")})
        cfg["finetune"].update(run.finetune)
        every = (max(1, int(cfg["finetune"]["steps"]) // self.curve_points) if self.curve_points
                 else self.curve_every)
        settings = {"cfg": cfg, "init": run.init, "seed": run.seed, "dataset": self.dataset,
                    "fraction": self.fraction_of(run), "weights": str(self.pretrained(run.init)),
                    "curve_every": every, "n_dev": self.n_dev, "dev_per_class": True}
        if self.holdout:  # (absent otherwise, so that earlier runs keep their cache keys)
            settings["holdout"] = self.holdout
        return settings

    def _run_dir(self, settings: dict) -> Path:
        """Keyed as the workflow keys a job: settings added later, at their default, leave earlier keys valid."""
        cfg = {**settings["cfg"], "finetune": without_later_defaults(settings["cfg"]["finetune"], "finetune")}
        return self.cache / "finetune" / json_digest({**settings, "cfg": cfg})[:16]


def nested_pool_order(domains: pd.Series, seed: int) -> np.ndarray:
    """An order of a pool's rows whose every prefix keeps each domain at its share of the pool (within one volume):
    each domain's rows are shuffled (with `seed`) and row i of a domain of n rows is placed at (i + 0.5) / n. So
    the first 100 volumes are a subset of the first 500, and the pool curve measures adding volumes, not drawing
    other ones; nothing in numpy or pandas draws nested stratified subsets."""
    rng = np.random.default_rng(seed)
    positions = np.empty(len(domains))
    for _, rows in sorted(pd.Series(range(len(domains)), index=domains.to_numpy()).groupby(level=0)):
        shuffled = rng.permutation(rows.to_numpy())
        positions[shuffled] = (np.arange(len(shuffled)) + 0.5) / len(shuffled)
    tiebreak = rng.random(len(domains))
    return np.lexsort((tiebreak, positions))


# -- tables and plots ----------------------------------------------------------------------------------------
def results_table(metrics: list[Path], labels: list[str]) -> pd.DataFrame:
    """Per variant: dev Dice at the last step (mean ± sd over seeds) and the test summary of ctssl.report.
    `labels[i]` names the variant of `metrics[i]` (a cached run may have been made under another name)."""
    long, cells, _ = collect(metrics, dict(zip(map(str, metrics), labels, strict=True)))
    test = summary_table(cells, long)
    dev = []
    for path, label in zip(metrics, labels, strict=True):
        run, curve = read_json(path.parent / "run.json"), pd.read_csv(path.parent / "curve.csv")
        last = curve.iloc[-1]
        dev.append({"init": label, "seed": run["seed"],
                    **{k: 100 * last[k] for k in curve.columns if k.startswith("dev_")}})
    dev = pd.DataFrame(dev)
    dev_stats = dev.groupby("init")["dev_dice"].agg(["mean", "std"]).rename(
        columns={"mean": "dev_dice_mean", "std": "dev_dice_sd"})
    dev_stats = dev_stats.join(dev.drop(columns=["seed", "dev_dice"]).groupby("init").mean())
    # Per class (test): a mean over classes can hide that one class is never learned by anyone.
    per_class = (100 * long.groupby(["init", "seed", "class"])["dice"].mean().groupby(["init", "class"]).mean()
                 ).unstack("class").add_prefix("test_")
    table = test.set_index("init").join(dev_stats).join(per_class).reindex(list(dict.fromkeys(labels)))
    dev_classes = [c for c in dev_stats.columns if c not in ("dev_dice_mean", "dev_dice_sd")]
    columns = ["dev_dice_mean", "dev_dice_sd", *dev_classes, "dice_mean", "dice_sd", "delta_vs_scratch",
               "p_wilcoxon", "n_pairs", "n_seeds", *per_class.columns]
    return table[columns].rename(columns={"dice_mean": "test_dice_mean", "dice_sd": "test_dice_sd"})


def curves_frame(metrics: list[Path], labels: list[str]) -> pd.DataFrame:
    frames = []
    for path, label in zip(metrics, labels, strict=True):
        curve = pd.read_csv(path.parent / "curve.csv")
        frames.append(curve.assign(variant=label, seed=read_json(path.parent / "run.json")["seed"]))
    return pd.concat(frames, ignore_index=True)


def plot_curves(curves: pd.DataFrame, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for variant, group in curves.groupby("variant", sort=False):
        stats = group.groupby("step")["dev_dice"].agg(["mean", "std"]).fillna(0)
        ax.plot(stats.index, 100 * stats["mean"], marker=".", label=variant)
        ax.fill_between(stats.index, 100 * (stats["mean"] - stats["std"]), 100 * (stats["mean"] + stats["std"]),
                        alpha=0.15)
    ax.set_xlabel("fine-tuning step")
    ax.set_ylabel("dev mean foreground Dice (%)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(name: str, study: Study, runs: list[Run], out_dir: Path, title: str) -> pd.DataFrame:
    metrics = [study.finetune(run) for run in runs]
    labels = [run.label for run in runs]
    table = results_table(metrics, labels)
    out_dir.mkdir(parents=True, exist_ok=True)
    table.to_csv(out_dir / "table.csv")
    header = (f"# {name}: {title}\n\n{study.dataset}, {study.fraction:g} % labels, seeds "
              f"{sorted({r.seed for r in runs})}; dev = {study.n_dev} training cases outside each labelled subset "
              f"(decisions), test = the fixed test set (reported, never used to choose). Dice in %.\n\n")
    (out_dir / "table.md").write_text(header + table.round(2).to_markdown() + "\n")
    plot_curves(curves_frame(metrics, labels), out_dir / "curves.png", f"{name}: {title}")
    return table


# -- the experiments -----------------------------------------------------------------------------------------
def _grid(inits: dict[str, str], seeds: list[int], finetune: dict | None = None) -> list[Run]:
    return [Run(label, init, seed, dict(finetune or {})) for label, init in inits.items() for seed in seeds]


def exp_controls(study: Study, out: Path, seeds: list[int]) -> pd.DataFrame:
    """Every init at the issue's protocol, plus the two controls: the pretraining seed's untrained weights
    ('init-only', pretraining length 0) and supervised pretraining on the other labelled domains."""
    steps = SHORT
    inits = {"scratch": "scratch", "init-only": "pgl@0", **{f"{m}@{steps}": f"{m}@{steps}"
                                                             for m in ("pgl", "byol", "hssl", "genesis")},
             "supervised@1000": "supervised@1000"}
    return write_outputs("controls", study, _grid(inits, seeds), out, "every init, issue protocol")


def exp_length(study: Study, out: Path, seeds: list[int]) -> pd.DataFrame:
    """Pretraining length sweep (separate runs, each with its own full LR schedule)."""
    inits = {"scratch": "scratch", **{f"pgl@{n}": f"pgl@{n}" for n in LENGTHS}}
    return write_outputs("length", study, _grid(inits, seeds), out, "PGL pretraining length")


def exp_lr(study: Study, out: Path, seeds: list[int]) -> pd.DataFrame:
    """Fine-tuning learning rate, warm-up and the two-stage (head first) warm-up, per init kind; read the dev
    column. The issue's protocol is AdamW 1e-2 with 8 warm-up steps for every init."""
    settings = {"lr1e-2": {"lr": 1e-2}, "lr1e-3": {"lr": 1e-3},
                "lr1e-2 head40": {"lr": 1e-2, "head_warmup_steps": 40}}
    runs = []
    for name, ft in settings.items():
        for label, init in (("scratch", "scratch"), ("pgl", BEST_SSL), ("supervised", "supervised@1000")):
            variant = "scratch" if (label == "scratch" and name == "lr1e-2") else f"{label} {name}"
            runs += [Run(variant, init, s, ft) for s in seeds]
    return write_outputs("lr", study, runs, out, "fine-tuning LR / warm-up (choose on dev)")


def exp_collapse(study: Study, out: Path, seeds: list[int]) -> pd.DataFrame:
    """PGL with and without the anti-collapse terms (VICReg variance + covariance on the voxel projections)."""
    inits = {"scratch": "scratch", f"pgl@{SHORT}": f"pgl@{SHORT}", f"pgl-decor@{SHORT}": f"pgl-decor@{SHORT}"}
    return write_outputs("collapse", study, _grid(inits, seeds), out, "PGL dimensional collapse and its fix")


def exp_invariance(study: Study, out: Path, seeds: list[int]) -> pd.DataFrame:
    """Do the views' intensity augmentations teach invariance to HU, the cue the downstream task uses?"""
    inits = {"scratch": "scratch", f"pgl@{SHORT}": f"pgl@{SHORT}", f"pgl-hu@{SHORT}": f"pgl-hu@{SHORT}"}
    return write_outputs("invariance", study, _grid(inits, seeds), out, "HU-changing view augmentations on/off")


def exp_probe(study: Study, out: Path, seeds: list[int]) -> pd.DataFrame:
    """Frozen backbone, only the segmentation head trained: do the pretrained features encode anything?"""
    inits = {"scratch": "scratch", "random (frozen)": "pgl@0", f"{BEST_SSL} (frozen)": BEST_SSL,
             "supervised@1000 (frozen)": "supervised@1000"}
    runs = [Run(label, init, s, {} if init == "scratch" else {"freeze_backbone": True})
            for label, init in inits.items() for s in seeds]
    return write_outputs("probe", study, runs, out, "frozen-backbone probe (head only)")


def exp_weights(study: Study, out: Path, seeds: list[int]) -> pd.DataFrame:
    """Per-layer RMS of each init relative to the untrained start, the fine-tuning drift, activation scales."""
    inits = ["pgl@0", *(f"{m}@{SHORT}" for m in ("pgl", "byol", "hssl", "genesis")), BEST_SSL, "supervised@1000"]
    start = torch.load(study.pretrained("pgl@0"), weights_only=True)
    start_rms = weight_norms(start).set_index("tensor")["rms"]
    image = np.load(study.preprocessed / f"{read_json(study.splits_path)['train'][0]}.npy")
    patch = study.cfg["finetune"]["patch_size"]
    x = torch.from_numpy(np.ascontiguousarray(image[: patch[0], : patch[1], : patch[2]]))[None, None].float()
    rows = []
    for init in inits:
        state = torch.load(study.pretrained(init), weights_only=True)
        norms = weight_norms(state).set_index("tensor")["rms"] / start_rms
        backbone = build_backbone(study.cfg["model"])
        backbone.load_state_dict(state)
        scales = activation_scales(backbone, x)
        tuned = torch.load(study.finetune(Run(init, init, seeds[0])).parent / "backbone_after.pt", weights_only=True)
        rows.append({"init": init, "rms_ratio_median": float(norms.median()), "rms_ratio_max": float(norms.max()),
                     "drift_from_start_median": float(weight_drift(start, state)["relative_change"].median()),
                     **scales,
                     "finetune_drift_median": float(weight_drift(state, tuned)["relative_change"].median())})
    table = pd.DataFrame(rows).set_index("init")
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "table.csv")
    (out / "table.md").write_text("# weights: per-layer statistics of each init\n\n" + table.round(3).to_markdown() + "\n")
    return table


# -- the convergence rule (issue 24) -------------------------------------------------------------------------
# Fine-tuning lengths, separate runs, each with its own full cosine schedule; the longest (first seed only) is the
# doubling check of the one before it.
CONVERGENCE_STEPS = [500, 1000, 2000, 4000]
CONVERGENCE_LR_STEPS = 2000  # the provisional length, where the LR re-check runs
CONVERGENCE_LR = 1e-3  # the current schedule's LR
CONVERGENCE_LR_CHECK = [3e-4, 1e-3, 3e-3]  # the LR re-check around it, at CONVERGENCE_LR_STEPS
CONVERGENCE_TOLERANCE = 1.0  # Dice points
CONVERGENCE_TAIL = 0.2  # the last 20 % of a run's steps
CONVERGENCE_HOLDOUT = 6  # development cases held out of training for every run (so 100 % runs have them too)
CONVERGENCE_CURVE_POINTS = 20  # dev-Dice points per run


def tail_change(curve: pd.Series, tail: float = CONVERGENCE_TAIL) -> float:
    """How much a (seed-mean) dev-Dice curve, indexed by step, still moves over its last `tail` of steps:
    max - min of its points at step >= (1 - tail) * last step, in the curve's units."""
    last = curve.index.max()
    window = curve[curve.index >= (1 - tail) * last]
    return float(window.max() - window.min())


def convergence_table(curves: pd.DataFrame, tolerance: float = CONVERGENCE_TOLERANCE,
                      tail: float = CONVERGENCE_TAIL) -> pd.DataFrame:
    """Per (init, labelled, lr, steps) run group: final dev Dice (mean over seeds, Dice points), how much its
    curve moves over the last `tail` of steps, what doubling the steps adds to the final value (NaN where the
    sweep has no run twice as long), and whether it counts as converged: tail change < tolerance and doubling
    adds < tolerance. `curves`: columns init, labelled, lr, steps, seed, step, dev_dice (a fraction, 0-1)."""
    keys = ["init", "labelled", "lr", "steps"]
    mean = (100 * curves.groupby([*keys, "step"])["dev_dice"].mean()).rename("dice").reset_index()
    rows = []
    for key, group in mean.groupby(keys):
        curve = group.set_index("step")["dice"].sort_index()
        rows.append({**dict(zip(keys, key, strict=True)), "final": float(curve.iloc[-1]),
                     "tail_change": tail_change(curve, tail)})
    table = pd.DataFrame(rows).set_index(keys).sort_index()
    # Final dev Dice per seed; the doubling gain is a mean over the seeds that have both lengths (paired).
    finals = 100 * curves[curves["step"] == curves["steps"]].set_index([*keys, "seed"])["dev_dice"]
    gains = []
    for init, labelled, lr, steps in table.index:
        mine, doubled = (finals.xs((init, labelled, lr, n), level=keys) for n in (steps, 2 * steps)) \
            if (init, labelled, lr, 2 * steps) in table.index else (None, None)
        gains.append(np.nan if mine is None else float((doubled - mine).dropna().mean()))
    table["gain_if_doubled"] = gains
    table["converged"] = (table["tail_change"] < tolerance) & ~(table["gain_if_doubled"] >= tolerance)
    return table


def chosen_steps(table: pd.DataFrame, lr: float) -> int | None:
    """The shortest length at which every (init, labelled) run group at `lr` has converged (None: none has)."""
    at_lr = table.xs(lr, level="lr")
    for steps in sorted(at_lr.index.get_level_values("steps").unique()):
        if bool(at_lr.xs(steps, level="steps")["converged"].all()):
            return int(steps)
    return None


def plot_convergence(curves: pd.DataFrame, path: Path, title: str) -> None:
    """One panel per (init, labelled count): the seed-mean dev-Dice curve of every (length, LR) run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = list(curves.groupby(["init", "labelled"]).groups)
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.8), sharey=True, squeeze=False)
    for ax, (init, labelled) in zip(axes[0], panels, strict=True):
        panel = curves[(curves["init"] == init) & (curves["labelled"] == labelled)]
        for (steps, lr), group in panel.groupby(["steps", "lr"]):
            stats = group.groupby("step")["dev_dice"].agg(["mean", "std"]).fillna(0)
            line, = ax.plot(stats.index, 100 * stats["mean"], marker=".", ms=3,
                            ls="-" if lr == CONVERGENCE_LR else "--", label=f"{steps} steps, lr {lr:g}")
            ax.fill_between(stats.index, 100 * (stats["mean"] - stats["std"]),
                            100 * (stats["mean"] + stats["std"]), color=line.get_color(), alpha=0.12)
        ax.set_title(f"{init}, {labelled} labelled cases", fontsize=9)
        ax.set_xlabel("fine-tuning step")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("dev mean foreground Dice (%)")
    axes[0][-1].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def convergence_runs(lowest: int, n_train: int, seeds: list[int]) -> list[Run]:
    """Every length for every seed, except the longest, which runs for the first seed only: it is there to check
    that the next shorter length has converged (the doubling gain is taken per seed, so one seed suffices to
    measure it, and it costs as much as all shorter runs together)."""
    runs = []
    for steps in CONVERGENCE_STEPS:
        for init, weights in (("scratch", "scratch"), ("supervised", "supervised@1000")):
            for labelled in (lowest, n_train):
                for seed in seeds if steps != max(CONVERGENCE_STEPS) else seeds[:1]:
                    runs.append(Run(init, weights, seed, {"steps": steps, "lr": CONVERGENCE_LR}, labelled=labelled))
    return runs


def _convergence_study(study: Study) -> tuple[Study, int, int, int]:
    """The study with CONVERGENCE_HOLDOUT development cases held out of every run, the labelled count of the
    config's lowest fraction (what the science cells label), the training cases left and the config's training
    count."""
    study = Study(study.config_path, study.dataset, study.fraction, study.threads, holdout=CONVERGENCE_HOLDOUT)
    study.n_dev, study.curve_points = CONVERGENCE_HOLDOUT, CONVERGENCE_CURVE_POINTS
    n_train = len(read_json(study.splits_path)["train"])
    n_full = len(read_json(study.workflow_splits)["train"])
    return study, subset_size(min(map(float, study.cfg["fractions"])), n_full), n_train, n_full


def _dev_curves(study: Study, runs: list[Run], jobs: int) -> pd.DataFrame:
    """Every run's dev-Dice curve, with the columns convergence_table groups by."""
    frames = []
    for run, metrics in zip(runs, study.finetune_many(runs, jobs), strict=True):
        curve = pd.read_csv(metrics.parent / "curve.csv")
        frames.append(curve.assign(init=run.label, labelled=run.labelled, lr=run.finetune["lr"],
                                   steps=run.finetune["steps"], seed=run.seed))
    return pd.concat(frames, ignore_index=True)


def _write_convergence(out: Path, curves: pd.DataFrame, table: pd.DataFrame, header: str, title: str,
                       plot: Callable[[Path, str], None] | None = None) -> None:
    """curves.csv, table.csv, table.md and curves.png (`plot(path, title)`; default: the dev curves per run group)."""
    out.mkdir(parents=True, exist_ok=True)
    curves.to_csv(out / "curves.csv", index=False)
    table.to_csv(out / "table.csv")
    (out / "table.md").write_text(header + table.round(2).to_markdown() + "\n")
    (plot or (lambda path, text: plot_convergence(curves, path, text)))(out / "curves.png", title)


def exp_convergence(study: Study, out: Path, seeds: list[int], jobs: int = 1) -> pd.DataFrame:
    """How long to fine-tune, decided on development cases: scratch and the supervised control with the labelled
    count of the config's lowest fraction and with every remaining training case, each fine-tuned for
    CONVERGENCE_STEPS (separate runs). Dev = CONVERGENCE_HOLDOUT training cases held out of every run; the test set
    is not scored into any decision (its numbers are not even tabulated here)."""
    study, lowest, n_train, n_full = _convergence_study(study)
    curves = _dev_curves(study, convergence_runs(lowest, n_train, seeds), jobs)
    table = convergence_table(curves)
    chosen = chosen_steps(table, CONVERGENCE_LR)
    untested_doubling = (" It is the longest length tried, so it passed on its tail alone: what doubling it adds is "
                         "not measured." if chosen == max(CONVERGENCE_STEPS) else "")
    dev = read_json(study.splits_path)["development"]
    header = (f"# convergence: how long to fine-tune (chosen on development cases)\n\n"
              f"{study.dataset}; development = {len(dev)} training cases held out of every run ({', '.join(dev)}); "
              f"{lowest} labelled cases (the lowest fraction's count on all {n_full} training cases) and all "
              f"{n_train} remaining; seeds {seeds} ({max(CONVERGENCE_STEPS)} steps: seed {seeds[0]} only); AdamW "
              f"{CONVERGENCE_LR:g}, linear warm-up then cosine decay. Dice in %, mean over seeds. tail_change: "
              f"max - min of the seed-mean dev curve over the last {CONVERGENCE_TAIL:.0%} of steps; gain_if_doubled: "
              f"final dev Dice of the run twice as long minus this one's, paired by seed. Converged: both < "
              f"{CONVERGENCE_TOLERANCE:g} point.\n\n**Chosen: {chosen if chosen else 'none of the lengths tried'}"
              f"{' steps' if chosen else ''}.**{untested_doubling}\n\n")
    _write_convergence(out, curves, table, header, "fine-tuning length: dev Dice (mean ± sd over seeds)")
    return table


def convergence_lr_runs(lowest: int, seeds: list[int]) -> list[Run]:
    """The LR re-check at the provisional length: scratch and the supervised control at the lowest fraction's
    labelled count (where the LR matters most: few cases, many epochs over them), every CONVERGENCE_LR_CHECK."""
    return [Run(init, weights, seed, {"steps": CONVERGENCE_LR_STEPS, "lr": lr}, labelled=lowest)
            for lr in CONVERGENCE_LR_CHECK for init, weights in (("scratch", "scratch"), ("supervised", "supervised@1000"))
            for seed in seeds]


def exp_convergence_lr(study: Study, out: Path, seeds: list[int], jobs: int = 1) -> pd.DataFrame:
    """Issue 24's LR re-check: AdamW 1e-3 was chosen on 160-step runs; at the provisional length, does another LR
    end higher on the development cases? Same development cases and schedule shape as `convergence` (its
    1e-3 runs are the cached ones)."""
    study, lowest, _, n_full = _convergence_study(study)
    curves = _dev_curves(study, convergence_lr_runs(lowest, seeds), jobs)
    table = convergence_table(curves).droplevel("steps")[["final", "tail_change"]]  # one length: no doubling
    dev = read_json(study.splits_path)["development"]
    header = (f"# convergence-lr: the fine-tuning LR at {CONVERGENCE_LR_STEPS} steps (development cases)\n\n"
              f"{study.dataset}; development = {len(dev)} training cases held out of every run ({', '.join(dev)}); "
              f"{lowest} labelled cases (the lowest fraction's count on all {n_full} training cases); seeds {seeds}; "
              f"AdamW, linear warm-up then cosine decay, {CONVERGENCE_LR_STEPS} steps. Dice in %, mean over seeds; "
              f"tail_change as in `convergence`.\n\n")
    _write_convergence(out, curves, table, header, "fine-tuning LR: dev Dice (mean ± sd over seeds)")
    return table


LOWEST_CANDIDATES = [1, 2]  # labelled cases tried for the lowest fraction (the papers' 5 %: 1-2 of 28)
LOWEST_GAP = 15.0  # calibration (a), on development cases: scratch with every label - scratch at the candidate
LOWEST_SEEDS_AHEAD = 2  # calibration (b), on development cases: supervised above scratch in the seed mean and in
#                         at least this many seeds (the dev curve is a mean over cases: seeds are the unit here)


def lowest_fraction_runs(candidates: list[int], n_train: int, seeds: list[int], steps: int) -> list[Run]:
    """Scratch and the supervised control at each candidate labelled count, plus scratch with every remaining
    training case (the other end of the label gap), every seed, `steps` long (the science schedule)."""
    schedule = {"steps": steps, "lr": CONVERGENCE_LR}
    runs = [Run(init, weights, seed, schedule, labelled=labelled)
            for labelled in candidates for init, weights in (("scratch", "scratch"), ("supervised", "supervised@1000"))
            for seed in seeds]
    return runs + [Run("scratch", "scratch", seed, schedule, labelled=n_train) for seed in seeds]


def _final_dice(curves: pd.DataFrame) -> pd.DataFrame:
    """Each run's dev Dice at its last step, in points: columns init, labelled, seed, dice."""
    final = curves[curves["step"] == curves["steps"]]
    return final.assign(dice=100 * final["dev_dice"])[["init", "labelled", "seed", "dice"]]


def lowest_fraction_table(finals: pd.DataFrame, n_train: int, gap: float = LOWEST_GAP,
                          seeds_ahead: int = LOWEST_SEEDS_AHEAD) -> tuple[pd.DataFrame, int | None]:
    """Per candidate labelled count: scratch and supervised final dev Dice (seed means, points), the label gap
    (scratch with all `n_train` minus scratch here), supervised - scratch (seed mean) and in how many seeds the
    supervised control is ahead; and the chosen count: the largest candidate that passes both (a) gap >= `gap`
    and (b) supervised ahead in the mean and in >= `seeds_ahead` seeds (None: no candidate passes, so the data
    or split must change). `finals`: columns init, labelled, seed, dice (points). The 95 % bootstrap CI and the
    Wilcoxon p of supervised - scratch over seeds are reported beside the rule, not used by it (with 3 seeds, p
    cannot go below 0.25)."""
    wide = finals.pivot_table(index=["labelled", "seed"], columns="init", values="dice")
    full = float(wide.xs(n_train, level="labelled")["scratch"].mean())
    rows = []
    for labelled in sorted(set(finals["labelled"]) - {n_train}):
        here = wide.xs(labelled, level="labelled")
        delta = here["supervised"] - here["scratch"]
        label_gap = full - float(here["scratch"].mean())
        ahead = int((delta > 0).sum())
        low, high = bootstrap_ci(here[["supervised"]].to_numpy(), here[["scratch"]].to_numpy())
        rows.append({"labelled": labelled, "scratch": float(here["scratch"].mean()),
                     "supervised": float(here["supervised"].mean()), "label_gap": label_gap,
                     "supervised_minus_scratch": float(delta.mean()), "ci95_low": low, "ci95_high": high,
                     "p_wilcoxon": paired_wilcoxon(here["supervised"], here["scratch"])[0],
                     "seeds_ahead": f"{ahead}/{len(delta)}",
                     "a_gap": label_gap >= gap, "b_transfer": bool(delta.mean() > 0 and ahead >= seeds_ahead)})
    table = pd.DataFrame(rows).set_index("labelled")
    passing = table.index[table["a_gap"] & table["b_transfer"]]
    return table, (int(max(passing)) if len(passing) else None)


def exp_lowest_fraction(study: Study, out: Path, seeds: list[int], jobs: int = 1) -> pd.DataFrame:
    """Issue 24, after calibration (a) and (b) failed at 3 labelled cases: which lower labelled count gives the
    setting room to see transfer? Decided on the convergence study's development cases (never on test cases) with
    the rule of lowest_fraction_table, written before the runs: the chosen count then goes through the calibration
    on test cases again, scratch and the supervised control only."""
    study, _, n_train, n_full = _convergence_study(study)
    steps = int(study.cfg["finetune"]["steps"])
    curves = _dev_curves(study, lowest_fraction_runs(LOWEST_CANDIDATES, n_train, seeds, steps), jobs)
    table, chosen = lowest_fraction_table(_final_dice(curves), n_train)
    dev = read_json(study.splits_path)["development"]
    verdict = (f"{chosen} labelled cases ({100 * chosen / n_full:.2g} % of {n_full})" if chosen
               else "none: the data or split must change")
    header = (f"# lowest-fraction: how many labelled cases the lowest fraction gets (chosen on development cases)\n\n"
              f"{study.dataset}; development = {len(dev)} training cases held out of every run ({', '.join(dev)}); "
              f"candidates {LOWEST_CANDIDATES} labelled cases, and scratch with all {n_train} remaining; seeds "
              f"{seeds}; {steps} steps, AdamW {CONVERGENCE_LR:g}, the science schedule. Final dev Dice in %, mean "
              f"over seeds. Rule (fixed before the runs): the largest candidate with (a) label gap >= {LOWEST_GAP:g} "
              f"points and (b) the supervised control ahead of scratch in the seed mean and in >= "
              f"{LOWEST_SEEDS_AHEAD} seeds.\n\n**Chosen: "
              f"{verdict}.**\n\n")
    _write_convergence(out, curves, table, header, "lowest fraction: dev Dice (mean ± sd over seeds)")
    return table


def scratch_gap_runs(lowest: int, n_train: int, seeds: list[int], steps: int) -> list[Run]:
    """Scratch at the lowest labelled count and with every remaining training case: the label gap alone."""
    schedule = {"steps": steps, "lr": CONVERGENCE_LR}
    return [Run("scratch", "scratch", seed, schedule, labelled=labelled) for labelled in (lowest, n_train)
            for seed in seeds]


def per_class_finals(curves: pd.DataFrame) -> pd.DataFrame:
    """Final dev Dice (points) per labelled count and class, mean over seeds: rows labelled count, columns classes
    (the curves' dev_* columns, `dice` = the mean over classes)."""
    final = curves[curves["step"] == curves["steps"]]
    columns = ["dev_dice", *sorted(c for c in final.columns if c.startswith("dev_") and c != "dev_dice")]
    table = 100 * final.groupby("labelled")[columns].mean()
    return table.rename(columns=lambda c: "dice" if c == "dev_dice" else c.removeprefix("dev_"))


def exp_scratch_gap(study: Study, out: Path, seeds: list[int], jobs: int = 1) -> pd.DataFrame:
    """Issue 38's development-case probes of a setting: does scratch learn each class with every label, and how far
    is the lowest labelled count below it? Scratch only (no pretraining run), per class; decided on the
    convergence study's development cases, never on test cases."""
    study, lowest, n_train, _ = _convergence_study(study)
    steps = int(study.cfg["finetune"]["steps"])
    curves = _dev_curves(study, scratch_gap_runs(lowest, n_train, seeds, steps), jobs)
    table = per_class_finals(curves)
    dev = read_json(study.splits_path)["development"]
    header = (f"# scratch-gap: scratch with {lowest} and with all {n_train} labelled cases, per class (development "
              f"cases)\n\n{study.dataset}; development = {len(dev)} training cases held out of every run "
              f"({', '.join(dev)}); seeds {seeds}; {steps} steps, AdamW {CONVERGENCE_LR:g}. Final dev Dice in %, mean "
              f"over seeds; label gap {table['dice'].iloc[-1] - table['dice'].iloc[0]:+.1f} points.\n\n")
    _write_convergence(out, curves, table, header, "scratch-gap: dev Dice (mean ± sd over seeds)")
    return table


SUPERVISED_LENGTHS = [1000, 3000, 10000]  # supervised-control pretraining steps (1,000: the science config's)
SUPERVISED_LABELLED = 1  # the one labelled count whose label gap passed (a) in lowest-fraction


def supervised_length_runs(lengths: list[int], labelled: int, n_train: int, seeds: list[int],
                           steps: int) -> list[Run]:
    """Scratch and the supervised control pretrained for each of `lengths` steps at `labelled` cases, plus scratch
    with every remaining training case (the label gap), every seed, `steps` long."""
    schedule = {"steps": steps, "lr": CONVERGENCE_LR}
    runs = [Run("scratch", "scratch", seed, schedule, labelled=labelled) for seed in seeds]
    runs += [Run(f"supervised@{n}", f"supervised@{n}", seed, schedule, labelled=labelled)
             for n in lengths for seed in seeds]
    return runs + [Run("scratch", "scratch", seed, schedule, labelled=n_train) for seed in seeds]


def exp_supervised_length(study: Study, out: Path, seeds: list[int], jobs: int = 1,
                          lengths: list[int] | None = None) -> pd.DataFrame:
    """Issue 24, after lowest-fraction: is the supervised control too weak, not the setting? The control
    pretrained for each of `lengths` steps (default SUPERVISED_LENGTHS; same data), at SUPERVISED_LABELLED labelled
    cases, against
    scratch on the development cases, with lowest-fraction's rule (fixed before the runs): a length passes with
    (a) the label gap >= LOWEST_GAP and (b) the control ahead of scratch in the seed mean and in >= LOWEST_SEEDS_AHEAD
    seeds; a passing length goes through the calibration on test cases next."""
    lengths = sorted(lengths or SUPERVISED_LENGTHS)
    study, _, n_train, _ = _convergence_study(study)
    steps = int(study.cfg["finetune"]["steps"])
    curves = _dev_curves(study, supervised_length_runs(lengths, SUPERVISED_LABELLED, n_train, seeds, steps), jobs)
    finals = _final_dice(curves)
    rows = []
    for length in lengths:
        mine = finals[finals["init"].isin(["scratch", f"supervised@{length}"])].replace(
            {"init": {f"supervised@{length}": "supervised"}})
        table, chosen = lowest_fraction_table(mine, n_train)
        rows.append(table.reset_index().assign(supervised_steps=length, passes=chosen is not None))
    table = pd.concat(rows, ignore_index=True).set_index("supervised_steps")
    dev = read_json(study.splits_path)["development"]
    passing = [int(n) for n in table.index[table["passes"]]]
    header = (f"# supervised-length: is the supervised control too weak? (development cases)\n\n"
              f"{study.dataset}; development = {len(dev)} training cases held out of every run ({', '.join(dev)}); "
              f"{SUPERVISED_LABELLED} labelled case(s), scratch with all {n_train} remaining for the label gap; the "
              f"supervised control pretrained for {lengths} steps on the same data; seeds {seeds}; "
              f"{steps} fine-tuning steps, AdamW {CONVERGENCE_LR:g}. Final dev Dice in %, mean over seeds. Rule "
              f"(fixed before the runs, as lowest-fraction): (a) label gap >= {LOWEST_GAP:g} and (b) the control "
              f"ahead of scratch in the seed mean and in >= {LOWEST_SEEDS_AHEAD} seeds.\n\n**Passing: "
              f"{', '.join(f'{n} steps' for n in passing) if passing else 'none'}.**\n\n")
    _write_convergence(out, curves, table, header, "supervised-control length: dev Dice (mean ± sd over seeds)")
    return table


CURVE_METHODS = ["pgl", "hssl", "mae"]  # issue 38, point 3: PGL, HSSL (every domain of the pool) and MAE
CURVE_POOLS = [100, 500, 2000]  # unlabelled volumes the pretraining draws from
CURVE_LENGTHS = [3000, 10000, 30000]  # pretraining steps


def curve_runs(methods: list[str], pools: list[int], lengths: list[int], labelled: int, seeds: list[int],
               steps: int) -> list[Run]:
    """The two sweeps of each method, fine-tuned at `labelled` cases, every seed, `steps` long: the pool grows at
    the shortest length, the length grows on the largest pool (the point they share runs once); plus scratch."""
    schedule = {"steps": steps, "lr": CONVERGENCE_LR}
    points = dict.fromkeys([(volumes, min(lengths)) for volumes in sorted(pools)]
                           + [(max(pools), length) for length in sorted(lengths)])
    inits = [f"{method}@{length}:{volumes}" for method in methods for volumes, length in points]
    return [Run(init, init, seed, schedule, labelled=labelled) for init in ["scratch", *inits] for seed in seeds]


def curve_table(finals: pd.DataFrame, pools: list[int], lengths: list[int]) -> pd.DataFrame:
    """Per method and sweep point: final dev Dice (seed mean, points), Δ against scratch with its 95 % bootstrap CI
    over seeds (a seed is one labelled draw and one run: the unit of the run-level interval), the Wilcoxon p over
    seeds and how many seeds are ahead. `finals`: columns init ('scratch' or 'method@steps:volumes'), seed, dice."""
    wide = finals.pivot_table(index="seed", columns="init", values="dice")
    rows = []
    for init in [c for c in wide.columns if c != "scratch"]:
        method, length, volumes = parse_init(init)
        length, volumes = int(length), int(volumes)
        delta = wide[init] - wide["scratch"]
        low, high = bootstrap_ci(wide[[init]].to_numpy(), wide[["scratch"]].to_numpy())
        sweeps = [name for name, on in (("pool", length == min(lengths)), ("length", volumes == max(pools))) if on]
        for sweep in sweeps:
            rows.append({"method": method, "sweep": sweep, "volumes": volumes, "pretrain_steps": length,
                         "dice": float(wide[init].mean()), "scratch": float(wide["scratch"].mean()),
                         "delta_vs_scratch": float(delta.mean()), "ci95_low": low, "ci95_high": high,
                         "p_wilcoxon": paired_wilcoxon(wide[init], wide["scratch"])[0],
                         "seeds_ahead": f"{int((delta > 0).sum())}/{len(delta)}"})
    return pd.DataFrame(rows).sort_values(["sweep", "method", "volumes", "pretrain_steps"], ignore_index=True)


CURVE_TOLERANCE = 1.0  # points: two curve points closer than this in mean Δ count as equal; the cheaper is taken


def curve_choice(table: pd.DataFrame) -> tuple[int, int, str]:
    """The rule fixed before the curves ran (docs/science.md, "The curves"): the (volumes, pretraining steps) point
    with the largest Δ averaged over the methods, the cheaper one when another is within CURVE_TOLERANCE of it;
    if every Δ's CI includes 0, the cheapest. Cheaper: fewer pretraining steps (what every method pays), then fewer
    volumes. Returns (volumes, steps, the reason in words)."""
    points = table.drop_duplicates(["method", "volumes", "pretrain_steps"])
    mean = points.groupby(["pretrain_steps", "volumes"])["delta_vs_scratch"].mean().sort_index()  # cheapest first
    if ((points["ci95_low"] <= 0) & (points["ci95_high"] >= 0)).all():
        (steps, volumes), reason = mean.index[0], "every Δ's CI includes 0: the cheapest point"
    else:
        near = mean[mean >= mean.max() - CURVE_TOLERANCE]
        steps, volumes = near.index[0]
        reason = (f"the largest mean Δ ({mean.max():+.2f})" if near.index[0] == mean.idxmax() else
                  f"within {CURVE_TOLERANCE:g} point of the largest mean Δ ({mean.max():+.2f}) and cheaper")
    return int(volumes), int(steps), reason


def plot_curve_table(table: pd.DataFrame, path: Path, title: str) -> None:
    """Δ against scratch (95 % CI over seeds) as the pool grows and as pretraining grows, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.8), sharey=True)
    for ax, (sweep, x, xlabel) in zip(axes, (("pool", "volumes", "unlabelled volumes in the pool"),
                                             ("length", "pretrain_steps", "pretraining steps")), strict=True):
        for method, rows in table[table["sweep"] == sweep].groupby("method", sort=False):
            errors = [rows["delta_vs_scratch"] - rows["ci95_low"], rows["ci95_high"] - rows["delta_vs_scratch"]]
            ax.errorbar(rows[x], rows["delta_vs_scratch"], yerr=errors, marker="o", capsize=3, label=method)
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("Δ dev Dice vs scratch (points)")
    axes[1].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def exp_curves(study: Study, out: Path, seeds: list[int], jobs: int = 1, lengths: list[int] | None = None,
               methods: list[str] | None = None, pools: list[int] | None = None) -> pd.DataFrame:
    """Issue 38, point 3, on development cases (never test cases): does what pretraining buys at the lowest
    fraction grow with the unlabelled pool and with pretraining length? Each method (default CURVE_METHODS)
    pretrained on nested pools of `pools` volumes (default CURVE_POOLS) at the shortest of `lengths` (default
    CURVE_LENGTHS), and for each length on the largest pool; fine-tuned with the config's lowest fraction's labelled
    count against scratch. The dev cases are held out of fine-tuning, not of the unlabelled pool (they are training
    cases; the test cases never enter it)."""
    lengths, pools = sorted(lengths or CURVE_LENGTHS), sorted(pools or CURVE_POOLS)
    methods = methods or CURVE_METHODS
    study, lowest, _, n_full = _convergence_study(study)
    steps = int(study.cfg["finetune"]["steps"])
    curves = _dev_curves(study, curve_runs(methods, pools, lengths, lowest, seeds, steps), jobs)
    table = curve_table(_final_dice(curves), pools, lengths)
    volumes, length, reason = curve_choice(table)
    dev = read_json(study.splits_path)["development"]
    header = (f"# curves: does the gain grow with the unlabelled pool and with pretraining? (development cases)\n\n"
              f"{study.dataset}; development = {len(dev)} training cases held out of fine-tuning ({', '.join(dev)}); "
              f"{lowest} labelled case(s) (the config's lowest fraction of {n_full}); methods {methods}; pools "
              f"{pools} volumes (nested, each domain at its share) at {min(lengths)} pretraining steps, and "
              f"{lengths} steps on {max(pools)} volumes; seeds {seeds}; {steps} fine-tuning steps. Final dev Dice "
              f"in %; Δ against scratch with its 95 % bootstrap CI over seeds and the Wilcoxon p over seeds.\n\n"
              f"**Chosen by the rule: {volumes} volumes, {length} pretraining steps** ({reason}).\n\n")
    _write_convergence(out, curves, table.set_index("method"), header,
                       "Δ vs scratch at the lowest fraction (dev cases, 95 % CI over seeds)",
                       plot=lambda path, title: plot_curve_table(table, path, title))
    return table


def exp_calibration(study: Study, out: Path, seeds: list[int]) -> pd.DataFrame:
    """Issue 24's calibration, read off the workflow's report of the config (run it first with inits scratch and
    the supervised control): can this setting see transfer at all? `seeds` is unused: the cells are the
    workflow's."""
    from ctssl.report import calibration

    source = study.root / "report" / "dice_table.csv"
    if not source.exists():
        raise FileNotFoundError(f"{source}: run the workflow on {study.config_path} first (snakemake --cores N "
                                f"--configfile {study.config_path})")
    summary = pd.read_csv(source)
    table = calibration(summary, study.dataset)
    inits = sorted(set(summary["init"]))
    header = (f"# calibration: can {study.dataset} under this schedule see transfer? (test cases)\n\n"
              f"From {source} (inits in it: {', '.join(inits)}); the pre-registered criteria of issue 24, checked "
              f"before any SSL row is read. Dice in points; Δ with its run-level 95 % CI (seeds and test cases "
              f"resampled independently) and "
              f"the two-sided Wilcoxon signed-rank p (one comparison, uncorrected).\n\n")
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "table.csv", index=False)
    (out / "table.md").write_text(header + table.to_markdown(index=False) + "\n")
    return table.set_index("criterion")


EXPERIMENTS: dict[str, Callable[[Study, Path, list[int]], pd.DataFrame]] = {
    "calibration": exp_calibration, "controls": exp_controls, "collapse": exp_collapse,
    "convergence": exp_convergence,
    "convergence-lr": exp_convergence_lr, "curves": exp_curves, "invariance": exp_invariance,
    "length": exp_length, "lowest-fraction": exp_lowest_fraction, "lr": exp_lr, "probe": exp_probe,
    "scratch-gap": exp_scratch_gap,
    "supervised-length": exp_supervised_length, "weights": exp_weights,
}
