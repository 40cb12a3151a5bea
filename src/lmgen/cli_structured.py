"""`lmgen generate` structured-output flags: --json-schema FILE | --json | --regex RE | --choice A,B,C | --grammar FILE
(one of them), turned into a StructuredOutput; errors name the flag."""

from __future__ import annotations

import argparse

__all__ = ["add_structured_args", "structured_from_args"]


def add_structured_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("structured output (enforced token by token; one of)").add_mutually_exclusive_group()
    g.add_argument("--json-schema", metavar="FILE", help="the output is JSON valid against the JSON Schema in FILE")
    g.add_argument("--json", action="store_true", default=None, help="the output is a JSON object")
    g.add_argument("--regex", metavar="RE", help="the output matches the regular expression RE")
    g.add_argument("--choice", metavar="A,B,C", help="the output is one of these comma-separated strings")
    g.add_argument("--grammar", metavar="FILE", help="the output follows the Lark or GBNF grammar in FILE")


def _read_constraint(path: str, flag: str) -> str:
    from lmgen.sampling.structured.spec import MAX_CONSTRAINT_CHARS

    with open(path, encoding="utf-8") as f:
        text = f.read(MAX_CONSTRAINT_CHARS + 1)
    if len(text) > MAX_CONSTRAINT_CHARS:
        raise ValueError(f"{flag} {path}: the file is over {MAX_CONSTRAINT_CHARS} characters")
    return text


def structured_from_args(args: argparse.Namespace):
    """The StructuredOutput of --json-schema / --json / --regex / --choice / --grammar, or None."""
    from lmgen.sampling.structured.spec import StructuredOutput

    if getattr(args, "json_schema", None) is not None:
        return StructuredOutput(json_schema=_read_constraint(args.json_schema, "--json-schema"), param="--json-schema")
    if getattr(args, "json", None):
        return StructuredOutput(json_object=True, param="--json")
    if getattr(args, "regex", None) is not None:
        return StructuredOutput(regex=args.regex, param="--regex")
    if getattr(args, "choice", None) is not None:
        return StructuredOutput(choice=[c for c in args.choice.split(",") if c], param="--choice")
    if getattr(args, "grammar", None) is not None:
        return StructuredOutput(grammar=_read_constraint(args.grammar, "--grammar"), param="--grammar")
    return None
