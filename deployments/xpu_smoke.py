"""Smoke test of an Intel GPU (XPU) environment: ipex-llm's XPU kernels load, torch is the one
they are built for, and a low-bit model runs on the device.

    python -m deployments.xpu_smoke [--device auto|xpu|cpu] [--skip-kernels]

cluster/install-xpu.sh runs it right after installing the stack, so a broken environment
fails the image build or ``ray up`` instead of the first replica. Contract, in order:

1. Unless ``--skip-kernels``: torch, then ipex-llm's kernel modules ``xe_linear``,
   ``xe_batch`` and ``xe_addons`` (bigdl-core-xe-all) import, in the order ipex-llm imports
   them. The first that does not: one line on stderr naming it and the error, exit 1.
2. When the kernels were checked or the device is xpu: torch's version meets the torch pin of
   the project's ``xpu`` extra (pyproject.toml: the kernels are compiled
   against that torch and load beside no other), else one line, exit 1.
3. The device: ``xpu`` if asked for, or with ``auto`` if ``torch.xpu.is_available()``; ``cpu``
   only if asked for (the same model path, for an environment without a GPU, e.g. CI).
   ``auto`` without a GPU (an image build) stops after 2 with an OK line; ``xpu`` asked for
   without one: one line, exit 1.
4. A tiny random-weight Llama, built in-process with a fixed seed (no download), converted to
   sym_int4 by ``ipex_llm.optimize_model``, moved ``.half().to(device)``: one forward pass
   (its logits must be finite) and a few greedy tokens. One OK line on stdout naming the
   device, exit 0. An error in this step is not expected and raises with its traceback.

torch is imported inside the functions only: importing this module costs nothing.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import sys
from typing import Any

PROJECT = "ipex-llm-serve"
KERNEL_MODULES = ("xe_linear", "xe_batch", "xe_addons")
LOW_BIT = "sym_int4"
NEW_TOKENS = 4
PROMPT_LENGTH = 8
SEED = 0


class SmokeFailure(Exception):
    """An expected failure: reported as one line, exit status 1."""


def check_kernels() -> None:
    """Import torch, then each of ipex-llm's XPU kernel modules; the kernels are torch
    extensions, so torch must be loaded first. Raises SmokeFailure naming the first module
    that does not import."""
    for name in ("torch", *KERNEL_MODULES):
        try:
            importlib.import_module(name)
        except Exception as error:  # an ImportError, or whatever the extension's init raises
            raise SmokeFailure(f"cannot import {name}: {_one_line(error)}") from None


def pinned_torch() -> Any:
    """The torch specifier of the installed project's ``xpu`` extra (a SpecifierSet)."""
    from packaging.requirements import Requirement

    try:
        lines = importlib.metadata.requires(PROJECT) or []
    except importlib.metadata.PackageNotFoundError:
        raise SmokeFailure(f"{PROJECT} is not installed: no torch pin to check") from None
    for line in lines:
        requirement = Requirement(line)
        if (requirement.name == "torch" and requirement.marker is not None
                and requirement.marker.evaluate({"extra": "xpu"})):
            return requirement.specifier
    raise SmokeFailure(f"{PROJECT}'s xpu extra pins no torch")


def check_torch_version() -> str:
    """torch's version, if it meets the xpu extra's pin; else SmokeFailure."""
    import torch
    from packaging.version import Version

    specifier = pinned_torch()
    if not specifier.contains(Version(torch.__version__), prereleases=True):
        raise SmokeFailure(f"torch {torch.__version__} is installed, the XPU kernels need "
                           f"torch{specifier}")
    return str(torch.__version__)


def resolve_device(asked: str) -> str | None:
    """``xpu`` or ``cpu`` for the model run, or None: ``auto`` on a host without a GPU."""
    import torch

    has_xpu = hasattr(torch, "xpu") and torch.xpu.is_available()
    if asked == "xpu" and not has_xpu:
        raise SmokeFailure("--device xpu asked for, but torch.xpu.is_available() is False")
    if asked == "auto":
        return "xpu" if has_xpu else None
    return asked


def device_name(device: str) -> str:
    """A human name for the device the model ran on."""
    import torch

    if device == "xpu":
        index = torch.xpu.current_device()
        return f"xpu:{index} {torch.xpu.get_device_name(index)}"
    import cpuinfo

    return f"cpu {cpuinfo.get_cpu_info().get('brand_raw', '')}".rstrip()


def tiny_llama() -> Any:
    """A random-weight Llama small enough to build in a second (seeded: same weights each run).
    Widths are multiples of ipex-llm's quantization block, and heads are 64 wide like those of
    the models served (SmolLM2-135M's), so the XPU attention kernels take their usual path."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(SEED)
    config = LlamaConfig(vocab_size=256, hidden_size=256, intermediate_size=512,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=128, bos_token_id=1, eos_token_id=2,
                         pad_token_id=0)
    return LlamaForCausalLM(config).eval()


def run_model(device: str) -> list[int]:
    """Convert the tiny Llama to sym_int4, move it to ``device`` in fp16, run one forward pass
    and greedy decoding; the new token ids. SmokeFailure if the logits are not finite."""
    import torch
    from ipex_llm import optimize_model

    model = optimize_model(tiny_llama(), low_bit=LOW_BIT).half().to(device)
    generator = torch.Generator().manual_seed(SEED)
    ids = torch.randint(3, model.config.vocab_size, (1, PROMPT_LENGTH), generator=generator)
    ids = ids.to(device)
    with torch.inference_mode():
        logits = model(ids).logits
        if not torch.isfinite(logits).all():
            raise SmokeFailure(f"{LOW_BIT} forward pass on {device}: non-finite logits")
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS)
    return out[0, PROMPT_LENGTH:].tolist()


def smoke(device: str = "auto", *, skip_kernels: bool = False) -> str:
    """Steps 1-4 of the module's contract; the OK line. SmokeFailure on an expected failure."""
    checked: list[str] = []
    if not skip_kernels:
        check_kernels()
        checked.append("kernels " + ", ".join(KERNEL_MODULES))
    if not skip_kernels or device == "xpu":
        checked.append(f"torch {check_torch_version()}")
    target = resolve_device(device)
    if target is None:
        checked.append("no XPU device: model run skipped")
    else:
        tokens = run_model(target)
        checked.append(f"{LOW_BIT} tiny Llama on {device_name(target)}: "
                       f"greedy tokens {tokens}")
    return "xpu_smoke: OK " + "; ".join(checked)


def _one_line(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0]}" if text else type(error).__name__


def main(argv: list[str] | None = None) -> int:
    """The command line; 0 if the environment passed, 1 if not (one line on stderr)."""
    parser = argparse.ArgumentParser(prog="python -m deployments.xpu_smoke",
                                     description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--device", choices=("auto", "xpu", "cpu"), default="auto",
                        help="where the tiny model runs (auto: xpu if present, else no run)")
    parser.add_argument("--skip-kernels", action="store_true",
                        help="skip the xe_* imports and the torch pin (a CPU environment)")
    args = parser.parse_args(argv)
    try:
        print(smoke(args.device, skip_kernels=args.skip_kernels), flush=True)
    except SmokeFailure as failure:
        print(f"xpu_smoke: FAIL {failure}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
