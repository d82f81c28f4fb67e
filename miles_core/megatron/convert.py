"""`miles convert` hooks of the Megatron backend (a core built-in plugin): ``--to torch_dist`` writes an
HF checkpoint as a Megatron distributed checkpoint, ``--from torch_dist --input-dir CKPT`` writes one
back as HF (``--hf-checkpoint`` gives its config.json and tokenizer, like slime's ``--origin-hf-dir``).
megatron-core is imported only when one of them is asked for."""

from __future__ import annotations

import argparse

from miles_core import hookimpl
from miles_core.megatron import require
from miles_core.types import UsageError


@hookimpl
def add_convert_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("torch_dist (needs pip install 'miles-core[megatron]')")
    g.add_argument(
        "--from",
        dest="from_format",
        choices=["hf", "torch_dist"],
        default="hf",
        help="Source format: hf (--hf-checkpoint) or torch_dist (--input-dir; --hf-checkpoint then gives "
        "config.json and tokenizer). --to torch_dist writes an HF checkpoint as a Megatron one.",
    )
    g.add_argument("--input-dir", default=None, help="The torch_dist checkpoint of --from torch_dist.")


@hookimpl
def convert_checkpoint(args: argparse.Namespace, input_dir: str, output_dir: str) -> bool | None:
    if args.from_format == "torch_dist":
        if args.to not in (None, "hf") or not args.input_dir:
            raise UsageError(
                "--from torch_dist writes an HF checkpoint from --input-dir CKPT; pass --input-dir and "
                "drop --to (or use --to hf)."
            )
        require()
        from miles_core.megatron.torch_dist import torch_dist_to_hf

        torch_dist_to_hf(args.input_dir, input_dir, output_dir)
        return True
    if args.to != "torch_dist":
        return None
    require()
    from miles_core.megatron.torch_dist import hf_to_torch_dist

    hf_to_torch_dist(input_dir, output_dir)
    return True
