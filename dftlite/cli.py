"""The `dftlite` command: thin. Each subcommand parses its configs and calls one library function.

    dftlite sample --config configs/smollm2-135m_gsm8k_dft2_cpu.yaml   # negatives from the frozen base
    dftlite train  --config configs/smollm2-135m_gsm8k_dft2_cpu.yaml   # DFT2 LoRA (fp32, CPU)
    dftlite eval   --adapter_path runs/demo/run/adapter --data_path dev.jsonl
    dftlite export --adapter_path runs/demo/run/adapter --export_dir out/ --merge
    dftlite demo                                                     # the whole pipeline, embedded model

Every subcommand takes `--config file.yaml` (keys = field names) plus `--field value` overrides;
`dftlite <command> --help` lists the fields.
"""

from __future__ import annotations

import argparse
import logging
import sys

from dftlite import __version__, quiet_hub_kernel_lookup

COMMANDS = {
    "sample": "Sample negatives y' from the frozen base model P_g0(.|x̄) into a pool (JSONL).",
    "train": "Train with DFT2 (default), DFT or a baseline (sft, simpo, simpo_sft, dpo) on data + pool.",
    "eval": "GSM8K-style accuracy and the discrimination report (base vs adapter).",
    "export": "Save the adapter (PEFT, safetensors), optionally merged; model card; push to the Hub.",
    "demo": "The main job on the embedded SmolLM2-135M-Instruct: sample, train, eval, export.",
}


def _recipe_types():
    """Every command's config types: one recipe YAML may hold keys for sample, train and eval."""
    from dftlite.data import DataConfig
    from dftlite.evaluate import EvalConfig
    from dftlite.export import ExportConfig
    from dftlite.models import ModelConfig
    from dftlite.sampling import SampleConfig
    from dftlite.trainer import DFTConfig

    return (ModelConfig, DataConfig, SampleConfig, DFTConfig, EvalConfig, ExportConfig)


def _sample(argv):
    from dftlite.config import parse_args
    from dftlite.data import DataConfig
    from dftlite.models import ModelConfig
    from dftlite.sampling import SampleConfig, sample_pool

    model_config, data_config, sample_config = parse_args([ModelConfig, DataConfig, SampleConfig], argv, "dftlite sample", _recipe_types())
    sample_pool(model_config, data_config, sample_config)


def _train(argv):
    from dftlite.config import parse_args
    from dftlite.data import DataConfig
    from dftlite.models import ModelConfig
    from dftlite.trainer import DFTConfig, train

    model_config, data_config, dft_config = parse_args([ModelConfig, DataConfig, DFTConfig], argv, "dftlite train", _recipe_types())
    train(model_config, data_config, dft_config)


def _eval(argv):
    from dftlite.config import parse_args
    from dftlite.data import DataConfig
    from dftlite.evaluate import EvalConfig, evaluate
    from dftlite.models import ModelConfig

    model_config, data_config, eval_config = parse_args([ModelConfig, DataConfig, EvalConfig], argv, "dftlite eval", _recipe_types())
    evaluate(model_config, data_config, eval_config)


def _export(argv):
    from dftlite.config import parse_args
    from dftlite.export import ExportConfig, export
    from dftlite.models import ModelConfig

    model_config, export_config = parse_args([ModelConfig, ExportConfig], argv, "dftlite export", _recipe_types())
    export(model_config, export_config)


def _demo(argv):
    from dftlite.config import parse_args
    from dftlite.demo import DemoConfig, run_demo

    (demo_config,) = parse_args([DemoConfig], argv, "dftlite demo", _recipe_types())
    run_demo(demo_config)


HANDLERS = {"sample": _sample, "train": _train, "eval": _eval, "export": _export, "demo": _demo}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    verbose = "--verbose" in argv
    argv = [arg for arg in argv if arg != "--verbose"]
    if verbose:  # show the Hub-kernel lookup's warnings again (dftlite/__init__.py hides them)
        quiet_hub_kernel_lookup(False)
    parser = argparse.ArgumentParser(
        prog="dftlite",
        description="Discriminative Fine-Tuning (DFT/DFT2; Guo et al. 2025, arXiv 2502.18679) with QLoRA. "
        "Not TRL's loss_type='dft', which is Dynamic Fine-Tuning.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
        epilog="Run 'dftlite COMMAND --help' for a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"dftlite {__version__}")
    parser.add_argument("--verbose", action="store_true", help="Also show library warnings that dftlite hides "
                        "(bitsandbytes' Hub kernel loader); accepted anywhere on the command line.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    for name, help_ in COMMANDS.items():
        subparsers.add_parser(name, help=help_, add_help=False)
    args, rest = parser.parse_known_args(argv[:1])
    if args.command is None:
        parser.print_help()
        return 2
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from dftlite.config import ConfigError
    from dftlite.data import DataError

    try:
        HANDLERS[args.command](argv[1:])
    except (ConfigError, DataError, OSError) as err:  # bad input, a busy output, the disk: a message, not a traceback
        from rich.console import Console
        from rich.text import Text

        message = " ".join(line.strip() for line in str(err).splitlines() if line.strip())  # one line, whoever wrote it
        Console(stderr=True, soft_wrap=True).print(Text.assemble((f"dftlite {args.command}: error: ", "bold red"), message))
        return 1
    except KeyboardInterrupt:  # a second Ctrl-C in train, or any in sample/eval/export: outputs are whole (dftlite.outputs)
        resume = {"sample": " (it resumes)", "train": " with --resume_from_checkpoint last"}.get(args.command, "")
        print(f"\ndftlite {args.command}: interrupted; its outputs are whole or absent. Run it again{resume}.", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
