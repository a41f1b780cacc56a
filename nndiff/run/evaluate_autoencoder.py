"""Entry point ``nndiff_evaluate_autoencoder``: held-out reconstruction quality (PSNR, SSIM) and encode +
decode time of a fold's autoencoder stage — the ceiling of a latent diffusion model.

The library code is :func:`nndiff.evaluation.autoencoder.evaluate_autoencoder`; definitions in
documentation/latent.md ("Evaluation: autoencoder ceiling and time per sample").
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

from nndiff.run.common import add_path_flags, add_verbosity_flags, configure_logging, paths_from_args, run_cli

# spelled out here so --help does not import torch
DEFAULT_CHECKPOINT = "checkpoint_final.pth"
DEFAULT_OUTPUT = "autoencoder_evaluation.json"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nndiff_evaluate_autoencoder",
        description="Reconstruct held-out cases with the trained autoencoder of one fold of a latent configuration "
                    "(results/DatasetXXX/AutoencoderTrainer__<Plans>__<config>/fold_N): each case is read and "
                    "preprocessed as nndiff_predict does, padded to multiples of the downsampling factors, encoded "
                    "to the posterior mean and decoded (sliding windows above the plan's max_decode_voxels), "
                    "cropped back. Reports per case and mean PSNR and SSIM in original intensity units on the "
                    "configuration's grid (data range: max - min of the reference case, per channel) and the "
                    "encode + decode seconds per case. The autoencoder bounds what any latent model of this fold "
                    "can generate.")
    parser.add_argument("-d", dest="dataset", required=True, help="dataset id, DatasetXXX or DatasetXXX_Name")
    parser.add_argument("-c", dest="configuration", required=True,
                        help="a latent configuration (with an 'autoencoder' block), e.g. 2d_latent or 3d_latent")
    parser.add_argument("-f", dest="fold", required=True, help="fold of the autoencoder stage (a number or 'all')")
    parser.add_argument("-i", dest="input", default=None,
                        help="folder of held-out {CASE}_{XXXX}{ending} images (default: the raw dataset's imagesTs)")
    parser.add_argument("-o", dest="output", default=None, metavar="FILE",
                        help=f"summary JSON (default: {DEFAULT_OUTPUT} inside the autoencoder fold folder; "
                             "autoencoder_evaluation_<checkpoint>.json for another -chk)")
    parser.add_argument("-chk", dest="checkpoint", default=DEFAULT_CHECKPOINT,
                        help=f"autoencoder checkpoint (default {DEFAULT_CHECKPOINT}; checkpoint_best.pth also measured)")
    parser.add_argument("-device", default="auto", help="cuda, cpu or auto (default)")
    parser.add_argument("-p", dest="plans", default="nnDiffPlans", help="plans name (default nnDiffPlans)")
    add_path_flags(parser)
    add_verbosity_flags(parser)
    return parser


def _main(argv: Sequence[str] | None) -> int:
    from nndiff.evaluation.autoencoder import (autoencoder_evaluation_file, evaluate_autoencoder,
                                               format_autoencoder_table)

    args = build_parser().parse_args(argv)
    configure_logging(args)
    fold = args.fold if args.fold == "all" else _fold_number(args.fold)
    summary = evaluate_autoencoder(args.dataset, args.configuration, fold, paths_from_args(args),
                                   input_dir=args.input, output_file=args.output, checkpoint=args.checkpoint,
                                   device=args.device, plans_name=args.plans)
    print(format_autoencoder_table(summary))
    output = args.output or autoencoder_evaluation_file(Path(summary["autoencoder_dir"]), args.checkpoint)
    print(f"wrote {output}")
    return 0


def _fold_number(text: str) -> int:
    from nndiff.errors import NnDiffError

    try:
        return int(text)
    except ValueError:
        raise NnDiffError(f"-f {text}: the fold must be a number or 'all'. Fix: e.g. -f 0") from None


def evaluate_autoencoder_entry(argv: Sequence[str] | None = None) -> int:
    """Console script ``nndiff_evaluate_autoencoder``."""
    return run_cli(_main, argv)
