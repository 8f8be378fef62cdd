"""MkDocs hook: replace ``<!-- cli-reference -->`` in a page by the reference generated from argparse.

The parser is :func:`subprune.cli._parser`, so the page always shows the options
the installed command takes (mkdocs-click does this for click; this is the
argparse equivalent, with no extra dependency).
"""

from __future__ import annotations

import argparse

MARKER = "<!-- cli-reference -->"


def _options(parser: argparse.ArgumentParser) -> list[str]:
    rows = ["| option | default | help |", "|---|---|---|"]
    for action in parser._actions:
        if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
            continue
        names = ", ".join(f"`{o}`" for o in action.option_strings) or f"`{action.dest}`"
        if action.choices and not isinstance(action, argparse._StoreTrueAction):
            names += " {" + ", ".join(str(c) for c in action.choices) + "}"
        elif action.metavar:
            names += f" `{action.metavar}`"
        default = "" if action.default in (None, False, argparse.SUPPRESS) else f"`{action.default}`"
        text = (action.help or "").replace("|", "\\|").replace("\n", " ")
        rows.append(f"| {names} | {default} | {text} |")
    return rows


def reference() -> str:
    """Markdown: one section per subcommand, its usage and a table of its options."""
    from subprune.cli import _parser

    parser = _parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    helps = {choice.dest: choice.help for choice in sub._choices_actions}
    out = []
    for name, command in sub.choices.items():
        command.prog = f"subprune {name}"
        usage = command.format_usage().removeprefix("usage: ").strip()
        out += [f"## `subprune {name}`", "", helps.get(name) or "", "", "```text", usage, "```", ""]
        out += _options(command) + [""]
    return "\n".join(out)


def on_page_markdown(markdown: str, **kwargs) -> str:
    if MARKER in markdown:
        return markdown.replace(MARKER, reference())
    return markdown
