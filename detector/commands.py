"""``weightbias detector train|evaluate``, ``weightbias score``, ``weightbias insidebias`` and
``weightbias compare``.

The command-line face of the detector package: each subcommand parses its arguments, calls
the package's functions and prints a line for people or one JSON object (``--json``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from detector.names import DETECTOR_NAMES, SPLITS, TARGETS
from detector.report import DEFAULT_PERMUTATIONS, PROJECTION_KINDS

EXIT_REFUSED = 2  # as for any bad input (detector.cli): some checkpoint could not be scored

# Handlers import what they call when they run: building the parser (``weightbias --help``)
# must load neither torch nor scikit-learn nor Ray.


def add_detector_commands(subparsers: argparse._SubParsersAction) -> None:
    det = subparsers.add_parser("detector", help="train and evaluate weight-space bias detectors",
                                description="Learn from a zoo to tell biased from unbiased models by "
                                "their weights alone, and measure how well that transfers.")
    commands = det.add_subparsers(dest="detector_command", required=True, metavar="COMMAND")

    train = commands.add_parser("train", help="fit a detector on a zoo and save it",
                                description="Fit a detector on the zoo's training split, score it on the "
                                "held-out split, and save both in folder --out.")
    train.add_argument("store", type=Path, help="zoo store (Zarr)")
    train.add_argument("--out", type=Path, required=True, help="detector folder to write")
    train.add_argument("--detector", choices=DETECTOR_NAMES,
                       help="default: probe (best across pools, recipes and widths, and on face groups, "
                       "in docs/detectors.md)")
    train.add_argument("--target", choices=TARGETS, default="bias_level",
                       help="what to predict: the bias level (σ², ρ or favoured face group), biased vs "
                       "unbiased, or the regularizer used")
    train.add_argument("--split", choices=SPLITS, default="pool",
                       help="pool: train on one training pool's models, test on the other's (default)")
    train.add_argument("--train-pool", default="A")
    train.add_argument("--levels", nargs="+", help="keep only models at these bias levels (e.g. 0.02 0.05)")
    train.add_argument("--data-dir", type=Path,
                       help="data root for the probe detector's battery (else $WEIGHTBIAS_DATA, the cache)")
    _add_memory_budget(train)
    train.add_argument("--json", action="store_true", help="print one JSON object")
    train.set_defaults(handler=_train)

    recal = commands.add_parser(
        "recalibrate", help="move a probe detector to another width or recipe (refit its cut points only)",
        description="Refit only the cut points of a probe detector's head on labelled reference models of "
        "another width, taken from --zoo or trained here with the detector's own zoo recipe (or with yours: "
        "--recipe), and write the detector for those checkpoints to --out.")
    recal.add_argument("detector", type=Path, help="detector folder (a probe detector)")
    recal.add_argument("--width", type=float, required=True, help="the width of the checkpoints to score")
    recal.add_argument("--out", type=Path, required=True, help="detector folder to write")
    recal.add_argument("--zoo", type=Path, help="a store of labelled models at that width (else: train them)")
    recal.add_argument("--pool", help="take reference models of this pool only")
    recal.add_argument("--per-class", type=int, default=8, help="reference models per class (default: 8)")
    recal.add_argument("--recipe", nargs="+", default=[], metavar="AXIS=VALUE", type=_recipe_value,
                       help="train the reference models with your recipe, e.g. optimizer=sgd lr=0.005 "
                       "epochs=5 batch_size=32 train_size=12000 (zoo spec axes)")
    recal.add_argument("--reference-store", type=Path, help="where trained reference models go "
                       "(default: OUT.reference.zarr beside --out)")
    recal.add_argument("--data-dir", type=Path, help="data root (else $WEIGHTBIAS_DATA, the cache)")
    recal.add_argument("--address", help="Ray cluster address for training reference models")
    recal.add_argument("--num-cpus", type=int, help="CPUs for the local Ray instance")
    recal.add_argument("--json", action="store_true", help="print one JSON object")
    recal.set_defaults(handler=_recalibrate)

    evaluate = commands.add_parser("evaluate", help="score a saved detector on a zoo's models",
                                   description="Accuracy, balanced accuracy, AUC and confusion matrix of "
                                   "a detector on (a pool of) a zoo, with a per-regularizer breakdown.")
    evaluate.add_argument("detector", type=Path, help="detector folder")
    evaluate.add_argument("store", type=Path, help="zoo store (Zarr)")
    evaluate.add_argument("--pool", help="only models of this training pool (default: all done models)")
    evaluate.add_argument("--levels", nargs="+", help="keep only models at these bias levels")
    _add_memory_budget(evaluate)
    evaluate.add_argument("--json", action="store_true", help="print one JSON object")
    evaluate.set_defaults(handler=_evaluate)

    score = subparsers.add_parser(
        "score", help="tell whether checkpoints carry hidden bias, and how sure that is",
        description="Read checkpoints (.pt/.pth/.ckpt loaded with weights_only, also Lightning and "
        "{'model_state_dict': ...} dicts; .safetensors; .h5, ours or Keras), recognise each one's "
        "architecture and width by its layer shapes, whatever its tensors are called, and judge it with "
        "a trained detector: a calibrated probability, whether the checkpoint is like the detector's "
        "training models, the features that drove the verdict and the nearest training models. With "
        "--probes, add InsideBias. Exit status 2 if any checkpoint was refused (the others are scored).")
    score.add_argument("checkpoints", type=Path, nargs="+", metavar="FILE_OR_DIR",
                       help="checkpoint files, or folders: every checkpoint file in them")
    score.add_argument("--detector", type=Path, required=True, help="detector folder")
    score.add_argument("--probes", type=Path, help="folder with one sub-folder of images per group")
    score.add_argument("--arch", help="architecture name, if it is not to be recognised among all known ones")
    score.add_argument("--model-def", metavar="MODULE:CLASS",
                       help="your network's class (built with no arguments) for state_dict files of another "
                       "architecture; a probe detector then judges what it does (TorchScript and .pt2 "
                       "programs need no class)")
    score.add_argument("--json", action="store_true", help="print one JSON object per checkpoint, one a line")
    score.set_defaults(handler=_score)

    inside = subparsers.add_parser("insidebias", help="InsideBias activation ratios of a face model",
                                   description="Per-layer activation λ and ratio Λ for each group from a "
                                   "few probe images per group (Serna et al., ICPR 2020); a low min Λ "
                                   "flags bias and names the group.")
    inside.add_argument("checkpoint", type=Path)
    inside.add_argument("--task", choices=("faces",), default="faces")
    inside.add_argument("--dataset", default="utkface_crop_part1",
                        help="face folder under <data root>/faces/, or a path; probes come from its "
                        "balanced test set")
    inside.add_argument("--data-dir", type=Path, help="data root (else $WEIGHTBIAS_DATA, the cache)")
    inside.add_argument("--per-group", type=int, default=5)
    inside.add_argument("--seed", type=int, default=0)
    inside.add_argument("--json", action="store_true", help="print one JSON object")
    inside.set_defaults(handler=_insidebias)

    compare = subparsers.add_parser(
        "compare", help="report how each regularizer changes a zoo's models (HTML/Markdown + PNG + JSON)",
        description="Group a zoo's models by (regularizer, γ) and compare every group with vanilla: detector "
        "scores (with --detector), a PCA of weight features, per-layer weight shifts, first-layer colour "
        "sensitivity (MNIST tasks), InsideBias (face zoos), accuracy vs fairness, and an energy distance "
        "with a permutation test. Writes index.html, index.md, PNG plots and summary.json into --out.")
    compare.add_argument("store", type=Path, help="zoo store (Zarr)")
    compare.add_argument("--out", type=Path, required=True, help="report folder to write")
    compare.add_argument("--detector", type=Path, help="detector folder from `weightbias detector train`")
    compare.add_argument("--features", choices=PROJECTION_KINDS, default="invariant",
                         help="weight features for the projection and the distance test (default: invariant)")
    compare.add_argument("--permutations", type=int, default=DEFAULT_PERMUTATIONS,
                         help=f"permutations per distance test (default: {DEFAULT_PERMUTATIONS})")
    compare.add_argument("--seed", type=int, default=0, help="seed of the permutations and probe draws")
    compare.add_argument("--min-models", type=int, default=3,
                         help="groups with fewer models are shown but not tested (default: 3)")
    compare.add_argument("--data-dir", type=Path, help="data root for face probes (InsideBias; face zoos)")
    compare.add_argument("--per-group", type=int, default=5, help="InsideBias probe images per face group")
    compare.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    compare.set_defaults(handler=_compare)


def _recalibrate(args: argparse.Namespace) -> int:
    from detector.recalibrate import recalibrate_detector

    entry = recalibrate_detector(args.detector, args.width, args.out, zoo=args.zoo, pool=args.pool,
                                 per_class=args.per_class, recipe=dict(args.recipe),
                                 reference_store=args.reference_store,
                                 data_dir=args.data_dir, address=args.address, num_cpus=args.num_cpus,
                                 progress=True)
    _print(entry, args.json, [f"{args.detector} recalibrated for width {args.width:g} -> {args.out}",
                              f"  {entry['n_reference']} reference models from {entry['reference_store']}; "
                              f"cut points {entry['cut_points_before']} -> {entry['cut_points_after']}; "
                              f"reference accuracy {entry['reference_accuracy']:.1%}"])
    return 0


def _recipe_value(text: str) -> tuple[str, Any]:
    """``AXIS=VALUE``, the value read as JSON where it is (numbers) and as text otherwise."""
    axis, _, raw = text.partition("=")
    if not axis or not raw:
        raise argparse.ArgumentTypeError(f"expected AXIS=VALUE (e.g. epochs=5), got {text!r}")
    try:
        return axis, json.loads(raw)
    except json.JSONDecodeError:
        return axis, raw


def _add_memory_budget(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--memory-budget-gb", type=_positive_gb, metavar="GB",
                        help="most memory the detector's features of the zoo may take (default: half the "
                        "machine's); weights are read a chunk at a time, so only detectors on raw weights "
                        "(dense, layer_conv) come near it")


def _positive_gb(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number of GB, got {text}")
    return value


def _memory_budget(args: argparse.Namespace) -> float | None:
    return None if args.memory_budget_gb is None else args.memory_budget_gb * 2**30


def _print(result: dict[str, Any], as_json: bool, lines: list[str]) -> None:
    print(json.dumps(result) if as_json else "\n".join(lines))


def _scores_lines(scores: dict[str, Any]) -> list[str]:
    return [f"  n={scores['n_models']}  accuracy {scores['accuracy']:.4f}  "
            f"balanced {scores['balanced_accuracy']:.4f}  AUC {scores['auc']:.4f}",
            f"  classes {scores['classes']}",
            *(f"  {row}" for row in scores["confusion"])]


def _train(args: argparse.Namespace) -> int:
    from detector.verdicts import FEW_PER_CLASS
    from detector.workflow import train_detector

    _, info = train_detector(args.store, detector=args.detector, target=args.target, split=args.split,
                             train_pool=args.train_pool, levels=args.levels, out=args.out,
                             memory_budget=_memory_budget(args), progress=True, data_dir=args.data_dir)
    zoo, heldout, calibration = info["zoo"], info["heldout"], info["calibration"]
    lines = [f"{info['detector']} detector for {args.target} ({args.split} split: "
             f"{zoo['n_train']} train, {zoo['n_heldout']} held-out models) -> {args.out}"]
    if heldout["accuracy_ci"] is not None:
        low, high = heldout["accuracy_ci"]
        lines.append(f"  held-out accuracy {heldout['accuracy']:.1%} (95% CI {low:.1%}-{high:.1%}, "
                     f"n={heldout['n_models']})")
    ece = calibration["heldout"]
    lines.append(f"  calibration: {calibration['method']} {calibration['temperature']:g} on "
                 f"{calibration['fitted_on']}; held-out ECE {ece['ece_before']} -> {ece['ece_after']}")
    fewest = min(zoo["n_train_per_class"].values())
    if fewest < FEW_PER_CLASS:
        lines.append(f"  trained on only {fewest} models per class: verdicts will say so")
    _print(info, args.json, lines + _scores_lines(heldout))
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from detector.workflow import evaluate_detector

    result = evaluate_detector(args.detector, args.store, pool=args.pool, levels=args.levels,
                               memory_budget=_memory_budget(args), progress=True)
    lines = [f"{result['name']} detector ({result['target']}) on {args.store}"
             + (f" pool {args.pool}" if args.pool else ""), *_scores_lines(result["scores"])]
    for name, part in result.get("per_regularizer", {}).items():
        lines.append(f"  regularizer {name}: accuracy {part['accuracy']:.4f} (n={part['n_models']})")
    _print(result, args.json, lines)
    return 0


def _score(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from detector.scoring import score_checkpoints
    from detector.verdicts import summary_lines, verdict_lines

    results = []
    for result in score_checkpoints(args.checkpoints, args.detector, arch=args.arch, probes=args.probes,
                                    model_def=args.model_def, progress=True):
        results.append(result)
        print(json.dumps(result) if args.json else "\n".join(verdict_lines(result)), flush=True)
        if "refused" in result:  # through the bar, so the line is not glued onto it
            tqdm.write(f"weightbias: error: {result['checkpoint']}: {result['refused']}", file=sys.stderr)
    if not args.json and len(results) > 1:
        print("\n".join(summary_lines(results)))
    return EXIT_REFUSED if any("refused" in result for result in results) else 0


def _insidebias(args: argparse.Namespace) -> int:
    from detector.scoring import checkpoint_insidebias

    result = checkpoint_insidebias(args.checkpoint, dataset=args.dataset, data_dir=args.data_dir,
                                   per_group=args.per_group, seed=args.seed)
    lines = [f"{args.checkpoint}: InsideBias Λ with {args.per_group} probes per group"]
    for layer, ratios in result["ratio"].items():
        lines.append(f"  {layer:<8} " + "  ".join(f"{group} {ratio:.3f}" for group, ratio in ratios.items()))
    lines.append(f"  {result['default_layer']}: lowest group {result['lowest_group']} "
                 f"(min Λ {result['min_ratio']:.3f})")
    _print(result, args.json, lines)
    return 0


def _compare(args: argparse.Namespace) -> int:
    from detector.report import compare

    summary = compare(args.store, args.out, args.detector, feature_kind=args.features,
                      n_permutations=args.permutations, seed=args.seed, min_models=args.min_models,
                      data_dir=args.data_dir, probes_per_group=args.per_group)
    lines = [f"{args.out / 'index.html'}: {len(summary['groups'])} groups of {summary['n_done']} models, "
             f"baseline {summary['baseline']['label']}"]
    for label, test in summary["distances"]["per_group"].items():
        result = (test["skipped"] if "skipped" in test
                  else f"energy distance {test['energy_distance']:.4f}, p {test['p_value']:.4f}")
        lines.append(f"  {label}: {result}")
    lines += [f"  note: {note}" for note in summary["notes"]]
    _print(summary, args.json, lines)
    return 0
