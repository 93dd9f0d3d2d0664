"""`ctssl` console command: stages runnable outside Snakemake (debugging, notebooks, the resume tests)."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import yaml

from ctssl.logutil import setup_logging


def _pretrain(args: argparse.Namespace) -> int:
    from ctssl.config import complete_config, method_problems
    from ctssl.errors import ConfigError
    from ctssl.train.launch import Layout, pretrain_job

    log = setup_logging(args.log)
    try:
        cfg = complete_config(yaml.safe_load(Path(args.config).read_text()) or {})
        if args.world_size is not None and "pretrain" in cfg:
            cfg["pretrain"]["world_size"] = args.world_size
        missing = [key for key in ("model", "pretrain") if key not in cfg]
        if missing:
            problems = [f"{args.config}: needs the section(s) {missing}"]
        elif args.method not in cfg["pretrain"]["methods"]:
            problems = [f"--method {args.method}: not a registered method ({', '.join(cfg['pretrain']['methods'])})"]
        else:
            problems = method_problems(cfg, args.method)
    except ConfigError as exc:
        problems = [f"{args.config}: {exc}"]
    if problems:
        log.error("invalid configuration:\n%s", "\n".join(problems))
        return 2
    layout = Layout(world_size=cfg["pretrain"]["world_size"] or 1, timeout_s=cfg["pretrain"]["rank_timeout_s"])
    return pretrain_job(pool_csv=args.pool_csv, method=args.method, pool=args.pool, cfg=cfg, out_dir=args.out,
                        threads=args.threads, layout=layout, log_file=args.log)


def _config(args: argparse.Namespace) -> int:
    """Print a config as Snakemake will run it: every default filled in, or every problem, one per line."""
    from ctssl.config import load_config, method_config
    from ctssl.errors import ConfigError

    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    if args.method:
        if args.method not in config["pretrain"]["methods"]:
            print(f"--method {args.method}: not a registered method ({', '.join(config['pretrain']['methods'])})",
                  file=sys.stderr)
            return 2
        config = {"model": config["model"], "pretrain": method_config(config["pretrain"], args.method)}
    print(yaml.safe_dump(config, sort_keys=False, default_flow_style=None, width=120), end="")
    return 0


def _refused(action, errors: tuple[type[Exception], ...]) -> tuple[object, int]:
    """(result of `action()`, 0), or (None, 2) after logging one of the `errors` it raised (bad input, no traceback)."""
    try:
        return action(), 0
    except errors as exc:
        logging.getLogger("ctssl").error("%s", exc)
        return None, 2


def _export_bundle(args: argparse.Namespace) -> int:
    from ctssl.export import ExportError, export_monai_bundle

    setup_logging(None)
    out, status = _refused(lambda: export_monai_bundle(args.run_dir, args.out), (ExportError, FileExistsError))
    if not status:
        print(out)
    return status


def _export_nnunet(args: argparse.Namespace) -> int:
    from ctssl.export import ExportError
    from ctssl.nnunet.export import export_nnunet

    setup_logging(None)
    out, status = _refused(lambda: export_nnunet(args.run_dir, args.out, args.plans, args.configuration,
                                                 args.plans_name), (ExportError, FileExistsError))
    if not status:
        print(out)
    return status


def _synthesize(args: argparse.Namespace) -> int:
    from ctssl.data.synthetic import write_msd_dataset

    setup_logging(None)
    write_msd_dataset(args.out, args.name, args.profile, args.n_cases, args.seed)
    return 0


def _dicom2nifti(args: argparse.Namespace) -> int:
    from ctssl.data.dicom import DicomError, dicom_to_nifti

    setup_logging(None)
    written, status = _refused(lambda: dicom_to_nifti(args.dicom_dir, args.out_dir), (DicomError, FileExistsError))
    for uid, path in (written or {}).items():
        print(f"{uid}\t{path}")
    return status


def _convert(args: argparse.Namespace) -> int:
    from ctssl.data.images import convert_to_nifti
    from ctssl.errors import InputDataError

    setup_logging(None)
    written, status = _refused(lambda: convert_to_nifti(args.sources, args.out_dir), (InputDataError, FileExistsError))
    for path in written or []:
        print(path)
    return status


def _rehash(args: argparse.Namespace) -> int:
    from ctssl.integrity import IntegrityError, rehash_run

    setup_logging(None)
    digests, status = _refused(lambda: rehash_run(args.run_dir), (IntegrityError,))
    if not status:
        previous, new = digests
        print(f"{args.run_dir}/model.json: model_sha256 {previous} -> {new}" if previous != new
              else f"{args.run_dir}/model.json: model_sha256 {new} already matches model.pt; nothing changed")
    return status


def _predict(args: argparse.Namespace) -> int:
    from ctssl.errors import InputDataError
    from ctssl.predict import predict_files

    setup_logging(None)
    written, status = _refused(lambda: predict_files(args.cell_dir, args.images, args.out, args.device, args.tta,
                                                     args.save_probabilities),
                               (InputDataError, FileExistsError))  # IntegrityError is one
    for path in written or []:
        print(path)
    return status


def build_parser() -> argparse.ArgumentParser:
    """The whole command line (also used by the docs test to check every documented `ctssl` command parses)."""
    parser = argparse.ArgumentParser(prog="ctssl", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pretrain", help="pretrain one method on one pool manifest (resumes from its checkpoint)")
    p.add_argument("--config", required=True, help="YAML with 'model' and 'pretrain' sections")
    p.add_argument("--pool-csv", required=True)
    p.add_argument("--method", required=True)
    p.add_argument("--pool", default="all", help="pool name recorded in model.json")
    p.add_argument("--out", required=True, help="output folder (model.pt, model.json, checkpoints/)")
    p.add_argument("--threads", type=int, default=1, help="CPU threads of the job, shared by its ranks")
    p.add_argument("--world-size", type=int, default=None,
                   help="ranks on this machine (one per GPU, or gloo processes on CPU); default: pretrain.world_size")
    p.add_argument("--log", default=None)
    p.set_defaults(func=_pretrain)
    c = sub.add_parser("config", help="print a config with every default filled in (or list every problem in it)")
    c.add_argument("config", help="a config file, e.g. config.yaml")
    c.add_argument("--method", help="print only the model and this method's resolved pretraining settings")
    c.set_defaults(func=_config)
    e = sub.add_parser("export-bundle", help="write a pretraining run's backbone as a MONAI Bundle")
    e.add_argument("run_dir", help="a finished pretraining run, e.g. results/pretrain/pgl/all")
    e.add_argument("out", help="the bundle folder to create (an existing one is refused)")
    e.set_defaults(func=_export_bundle)
    n = sub.add_parser("export-nnunet", help="write a ResEnc pretraining run as nnU-Net -pretrained_weights and "
                                             "nnssl checkpoints (and a plans file for your dataset)")
    n.add_argument("run_dir", help="a finished pretraining run with model.arch resenc, e.g. results/pretrain/pgl/all")
    n.add_argument("out", help="the folder to create (an existing one is refused)")
    n.add_argument("--plans", help="your dataset's nnU-Net plans (e.g. $nnUNet_preprocessed/Dataset501_X/"
                                   "nnUNetPlans.json): a copy with ctssl's architecture is written beside it")
    n.add_argument("--configuration", default="3d_fullres", help="the plans configuration to take the weights")
    n.add_argument("--plans-name", default=None, help="name of the new plans file (default ctssl_METHOD-POOL)")
    n.set_defaults(func=_export_nnunet)
    r = sub.add_parser("rehash", help="after replacing a pretraining run's model.pt on purpose: record its new sha256 "
                                      "in model.json (the old one is kept under 'rehashed')")
    r.add_argument("run_dir", help="a pretraining run folder, e.g. results/pretrain/pgl/all")
    r.set_defaults(func=_rehash)
    q = sub.add_parser("predict", help="segment scans with a fine-tuned cell's model (either engine): label maps on "
                                       "each scan's own grid")
    q.add_argument("cell_dir", help="a fine-tuning cell, e.g. results/finetune/liver/pgl-all/frac10/seed0 or "
                                    ".../scratch@nnunet/frac10/seed0")
    q.add_argument("images", nargs="+", help="scans: .nii/.nii.gz, .nrrd/.nhdr, .mha/.mhd files, DICOM series folders, "
                                             "or folders of those (nnU-Net's imagesTs/: case_0000.nii.gz -> case.nii.gz)")
    q.add_argument("-o", "--out", required=True, help="output folder: one {case}.nii.gz per scan (existing files "
                                                       "are refused, never overwritten)")
    q.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None,
                   help="mirror along every axis and average (nnU-Net's test-time augmentation); default: as the cell "
                        "predicted its test cases (ctssl cells: off; nnU-Net cells: finetune.nnunet.mirroring)")
    q.add_argument("--save-probabilities", action="store_true",
                   help="also write {case}.npz: class probabilities (float16) on the preprocessed grid, with its affine")
    q.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    q.set_defaults(func=_predict)
    s = sub.add_parser("synthesize", help="write a synthetic CT dataset in MSD layout")
    s.add_argument("out")
    s.add_argument("--name", required=True)
    s.add_argument("--profile", required=True, choices=["liver", "spleen", "kidney", "chest"])
    s.add_argument("--n-cases", type=int, default=4)
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=_synthesize)
    d = sub.add_parser("dicom2nifti", help="convert every CT series under DICOM_DIR to OUT_DIR/{SeriesUID}.nii.gz")
    d.add_argument("dicom_dir")
    d.add_argument("out_dir")
    d.set_defaults(func=_dicom2nifti)
    v = sub.add_parser("convert", help="convert NIfTI/NRRD/MetaImage files or DICOM series folders to OUT_DIR/{case}"
                                       ".nii.gz, with the checks a dataset's images get")
    v.add_argument("sources", nargs="+", help=".nii(.gz), .nrrd, .nhdr, .mha, .mhd files or DICOM series folders")
    v.add_argument("out_dir", help="output folder (an existing file is refused, never overwritten)")
    v.set_defaults(func=_convert)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
