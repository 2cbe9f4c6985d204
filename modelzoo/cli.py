"""``weightbias zoo ...``: the command-line face of modelzoo (generate, info, export, verify).

A thin layer: each subcommand parses arguments, calls one public function, and prints.
:mod:`detector.cli` mounts these under the single ``weightbias`` command. Handlers import what
they call when they run, so ``weightbias --help`` and ``zoo info`` never import torch or Ray.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def add_zoo_commands(subparsers: argparse._SubParsersAction) -> None:
    zoo = subparsers.add_parser("zoo", help="generate, inspect, export and verify model zoos",
                                description="Generate, inspect, export and verify model zoos.")
    commands = zoo.add_subparsers(dest="zoo_command", required=True, metavar="COMMAND")

    gen = commands.add_parser("generate", help="train a zoo from a TOML spec with Ray (resumes)",
                              description="Train every model of SPEC on Ray and write it into a "
                              "Zarr store. Re-running the same command resumes: models already "
                              "done are skipped.")
    gen.add_argument("spec", type=Path, help="zoo spec (TOML)")
    gen.add_argument("--out", type=Path, required=True, help="Zarr store to create or resume")
    gen.add_argument("--data-dir", type=Path,
                     help="data root holding mnist/ (else $WEIGHTBIAS_DATA, the cache, a download)")
    gen.add_argument("--address", help="Ray cluster address (default: start a local instance)")
    gen.add_argument("--num-cpus", type=int, help="CPUs for the local Ray instance (default: all)")
    gen.add_argument("--cpus-per-task", type=float, default=1, help="CPUs (torch threads) per task")
    gen.add_argument("--gpus-per-task", type=float, help="GPU share per task (default: 0.25 if GPUs exist)")
    gen.add_argument("--max-models", type=_non_negative, help="train at most this many models in this run")
    gen.add_argument("--overwrite", action="store_true", help="delete an existing store first")
    gen.set_defaults(handler=_generate)

    info = commands.add_parser("info", help="summarize a zoo", description="Counts per axis, "
                               "mean accuracy per bias level, size on disk.")
    info.add_argument("store", type=Path)
    info.add_argument("--json", action="store_true", help="print one JSON object")
    info.set_defaults(handler=_info)

    export = commands.add_parser("export", help="write one model as a checkpoint file",
                                 description="Write one stored model as .pt (state_dict), "
                                 ".safetensors or .h5, chosen by the suffix of --out.")
    export.add_argument("store", type=Path)
    export.add_argument("--model", type=int, required=True, help="model index")
    export.add_argument("--out", type=Path, required=True, help="FILE.pt | FILE.safetensors | FILE.h5")
    export.set_defaults(handler=_export)

    data = commands.add_parser("data", help="show what one model of a spec trains on (data card)",
                               description="Write the class × sensitive-group table (card.json) and a "
                               "grid of training images (train_grid.png) of model --model of SPEC.")
    data.add_argument("spec", type=Path, help="zoo spec (TOML)")
    data.add_argument("--model", type=_non_negative, required=True, help="model index")
    data.add_argument("--out", type=Path, required=True, help="folder for card.json and train_grid.png")
    data.add_argument("--data-dir", type=Path, help="data root (else $WEIGHTBIAS_DATA or the cache)")
    data.set_defaults(handler=_data)

    check = commands.add_parser("verify", help="check a zoo's integrity",
                                description="Check shapes, NaN/Inf, done-vs-data consistency and "
                                "checksums. Exit status 1 if anything is wrong.")
    check.add_argument("store", type=Path)
    check.set_defaults(handler=_verify)


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def _generate(args: argparse.Namespace) -> int:
    from modelzoo.spec import load_spec
    from modelzoo.zoo import open_zoo

    spec = load_spec(args.spec)  # a bad spec fails here, before torch and Ray are imported
    from modelzoo.generation import generate

    summary = generate(spec, args.out, data_dir=args.data_dir, address=args.address,
                       num_cpus=args.num_cpus, max_models=args.max_models,
                       cpus_per_task=args.cpus_per_task, gpus_per_task=args.gpus_per_task,
                       overwrite=args.overwrite)
    print(f"{summary.store}: {summary.n_trained} models trained this run "
          f"({summary.models_per_hour:.0f} models/hour), "
          f"{summary.n_done}/{summary.n_models} done")
    if summary.models_per_node:
        nodes = ", ".join(f"{node}={count}" for node, count in sorted(summary.models_per_node.items()))
        print(f"models trained per Ray node: {nodes}")
    _print_info(open_zoo(args.out).info())
    return 0


def _info(args: argparse.Namespace) -> int:
    from modelzoo.zoo import open_zoo

    info = open_zoo(args.store).info()
    if args.json:
        print(json.dumps(info))
    else:
        _print_info(info)
    return 0


def _print_info(info: dict) -> None:
    print(f"zoo {info['path']}  task={info['task']}  arch={info['arch']} (width {info['width']}, "
          f"{info['n_params']:,} params)")
    print(f"models: {info['n_done']}/{info['n_models']} done   size on disk: "
          f"{info['size_on_disk_bytes'] / 2**20:.1f} MiB   data: {info['data_source']}")
    notes = info.get("data_notes") or {}
    if "test_size" in notes:
        print(f"  faces: test set {notes['test_size']}, pools A {notes['pool_sizes']['A']} / "
              f"B {notes['pool_sizes']['B']}")
    if notes.get("skipped"):
        print("  skipped: " + ", ".join(f"{count} {why}" for why, count in sorted(notes["skipped"].items())))
    for axis, values in info["counts_per_axis"].items():
        cells = ", ".join(f"{v}: {c['done']}/{c['total']}" for v, c in values.items())
        print(f"  {axis:<11} {cells}")
    for axis, r in info["ranges_per_axis"].items():
        print(f"  {axis:<11} sampled in [{r['min']:.4g}, {r['max']:.4g}], mean {r['mean']:.4g}")
    print(f"  {info['bias_level']:<11} n_done  unbiased_acc  biased_acc")
    for level, row in info["accuracy_per_bias_level"].items():
        if row["n_done"]:
            print(f"  {level:<11} {row['n_done']:>6}  {row['mean_unbiased_acc']:>12.4f}  "
                  f"{row['mean_biased_acc']:>10.4f}")


def _export(args: argparse.Namespace) -> int:
    from modelzoo.checkpoints import model_metadata, model_state_dict, save_checkpoint
    from modelzoo.zoo import open_zoo

    zoo = open_zoo(args.store)
    path = save_checkpoint(model_state_dict(zoo, args.model), args.out, model_metadata(zoo, args.model))
    print(f"wrote model {args.model} to {path}")
    return 0


def _data(args: argparse.Namespace) -> int:
    from modelzoo.datacard import data_card

    card = data_card(args.spec, args.model, args.out, args.data_dir)
    print(f"model {card['model']}: {card['n_train']} training images; group share "
          + ", ".join(f"{g} {s:.2f}" for g, s in zip(card["groups"], card["group_share"], strict=True)))
    if "group_differs_from_class" in card:
        differs = card["group_differs_from_class"]
        print(f"  the colour is nearest another digit's mean colour in {differs:.1%} of them")
    print(f"wrote {args.out / 'card.json'} and {args.out / 'train_grid.png'}")
    return 0


def _verify(args: argparse.Namespace) -> int:
    from modelzoo.zoo import open_zoo

    report = open_zoo(args.store).verify(progress=True)
    for problem in report.problems:
        print(f"PROBLEM: {problem}", file=sys.stderr)
    status = "OK" if report.ok else f"{len(report.problems)} problem(s)"
    print(f"{args.store}: {status}; {report.n_done}/{report.n_models} done, "
          f"{report.n_checked} checked")
    return 0 if report.ok else 1
