"""``python -m qrlora.export IN OUT``: an adapter file as a standard diffusers / PEFT LoRA (``B A = dW``).

The result loads with ``pipe.load_lora_weights(OUT)`` and combines with others through ``pipe.set_adapters``.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from .checkpoint import export_lora, load_adapter
from .errors import UserError, cli_entry


@cli_entry
def main(argv=None) -> Path:
    p = argparse.ArgumentParser(prog="python -m qrlora.export", description=__doc__)
    p.add_argument("input", help="a QR-LoRA adapter file (pytorch_lora_weights.safetensors)")
    p.add_argument("output", help="the LoRA file to write")
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args(argv)
    adapter = load_adapter(args.input)
    out = Path(args.output)
    if out.exists() and not args.overwrite:
        raise UserError(f"{out} already exists; pass --overwrite to replace it")
    export_lora(adapter, out)
    rank = 2 * adapter.config.rank if adapter.config.method == "qr" else adapter.config.rank
    print(f"wrote {out}: {len(adapter.layers)} layers, LoRA rank {rank}, under '{adapter.component}.'")
    return out


if __name__ == "__main__":
    main()
