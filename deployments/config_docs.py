"""docs/configuration.md, generated from the configuration models, so the reference cannot
drift from the code: every application arg (``LLMConfig``) and every engine's options
(deployments/engine/options.py), each with its type, default and the description declared
with the field.

    python -m deployments.config_docs            # rewrite docs/configuration.md
    python -m deployments.config_docs --check    # exit 1 if it is stale (a test runs this)
"""

from __future__ import annotations

import argparse
import json
import sys
import types
import typing
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from deployments.config import LLMConfig
from deployments.engine.options import OPTIONS_BY_ENGINE

DOC = Path(__file__).resolve().parent.parent / "docs" / "configuration.md"

INTRO = """\
# Configuration

Generated from the configuration models by `python -m deployments.config_docs` (a test fails
when this file is stale): edit the field descriptions in `deployments/config.py` and
`deployments/engine/options.py`, then run it.

An application's `args` in `serve_config.yaml` are `LLMConfig`'s fields. Unknown keys are
refused, and so are values out of range: `serve run` fails to build the application, naming
the field, before any replica starts. Ray Serve's own deployment options (`num_replicas`,
`autoscaling_config`, `max_ongoing_requests`, `max_queued_requests`, health checks,
`graceful_shutdown_timeout_s`, `ray_actor_options`) go in the config's `deployments:`
section, as Ray Serve documents them; `serve_config.yaml` sets them for `LLMServer` and
`LLMRouter` with the reasons in its comments.
"""


def type_name(annotation: Any) -> str:
    """A field's type as a reader writes it in YAML terms: ``float | null``, ``auto | cpu``."""
    if annotation is type(None):
        return "null"
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return " \\| ".join(str(value) for value in typing.get_args(annotation))
    if origin in (typing.Union, types.UnionType):
        names = dict.fromkeys(type_name(arg) for arg in typing.get_args(annotation))
        return " \\| ".join(names)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "mapping"
    if origin is typing.Annotated:
        return type_name(typing.get_args(annotation)[0])
    return {bool: "bool", int: "int", float: "float", str: "string"}.get(
        annotation, getattr(annotation, "__name__", str(annotation)))


def default_text(field: FieldInfo) -> str:
    if field.default_factory is not None:
        return "see below"
    text = json.dumps(field.default).replace("|", "\\|")
    return f"`{text}`"


def field_table(model: type[BaseModel], skip: tuple[str, ...] = ()) -> list[str]:
    rows = ["| field | type | default | meaning |", "|---|---|---|---|"]
    for name, field in model.model_fields.items():
        if name in skip:
            continue
        description = " ".join((field.description or "").split()).replace("|", "\\|")
        rows.append(f"| `{name}` | {type_name(field.annotation)} | {default_text(field)} | "
                    f"{description} |")
    return rows


def render() -> str:
    lines = [INTRO, "## Application args (`LLMConfig`)", "", *field_table(LLMConfig), "",
             "## Engine options", "",
             "`engine_options` holds the options of the application's `engine`, and only "
             "those.", ""]
    for engine, options in OPTIONS_BY_ENGINE.items():
        lines += [f"### `engine: {engine}`", "", " ".join((options.__doc__ or "").split()), "",
                  *field_table(options, skip=("engine",)), ""]
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deployments.config_docs",
                                     description="Write docs/configuration.md from the models.")
    parser.add_argument("--check", action="store_true",
                        help="exit 1 if docs/configuration.md differs from what would be written")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        current = DOC.read_text() if DOC.exists() else ""
        if current != text:
            print(f"{DOC} is stale: run python -m deployments.config_docs", file=sys.stderr)
            return 1
        return 0
    DOC.parent.mkdir(exist_ok=True)
    DOC.write_text(text)
    print(f"wrote {DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
