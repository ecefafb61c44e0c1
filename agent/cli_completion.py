"""`ferry completion bash`: a bash completion script, generated from the command line's own parser.

Generated rather than written by hand so it can never fall behind the commands: it walks the
argparse tree (agent/cli.py's build_parser) and turns it into case tables, one per command path
("", "vm", "vm create", ...): the subcommands and flags there, and the values of flags with fixed
choices. The script completes words only: it never runs ferry or asks an agent, so a slow or
absent agent cannot hang a shell's tab key. Install:

    ferry completion bash > /etc/bash_completion.d/ferry      # or: source <(ferry completion bash)
"""

from __future__ import annotations

import argparse
import shlex
from typing import Any

SHELLS = ("bash",)


def add_command(sub: Any) -> None:
    c = sub.add_parser("completion", help="print a shell completion script",
                       description="Print a completion script for SHELL on stdout, e.g. "
                                   "`source <(ferry completion bash)`.")
    c.add_argument("shell", metavar="SHELL", choices=SHELLS, help="the shell: " + ", ".join(SHELLS))
    c.set_defaults(run=None)


class Tree:
    """Per command path: its subcommands, its flags, and the choices of its flags that have them."""

    def __init__(self, parser: argparse.ArgumentParser) -> None:
        self.subs: dict[str, list[str]] = {}
        self.flags: dict[str, list[str]] = {}
        self.choices: dict[tuple[str, str], list[str]] = {}
        self._walk(parser, "")

    def _walk(self, parser: argparse.ArgumentParser, path: str) -> None:
        subs: list[str] = []
        flags: list[str] = []
        for action in parser._actions:  # argparse exposes no public walk of its tree
            if isinstance(action, argparse._SubParsersAction):
                for name, child in action.choices.items():
                    subs.append(name)
                    self._walk(child, f"{path} {name}".strip())
                continue
            flags += [o for o in action.option_strings if o.startswith("--")]
            if action.option_strings and action.choices:
                for o in action.option_strings:
                    self.choices[(path, o)] = [str(c) for c in action.choices]
        self.subs[path] = subs
        self.flags[path] = sorted(flags)


def bash_script(parser: argparse.ArgumentParser) -> str:
    tree = Tree(parser)
    prog = parser.prog

    def case(table: dict[str, list[str]]) -> str:
        return "\n".join(f"    {shlex.quote(k)}) echo {shlex.quote(' '.join(v))} ;;" for k, v in table.items() if v)

    words = {path: tree.subs[path] + tree.flags[path] for path in tree.subs}
    choices = {f"{path}|{flag}": values for (path, flag), values in tree.choices.items()}
    fn = f"_{prog}"
    return f"""# bash completion for {prog}: `source <({prog} completion bash)`
{fn}_subs() {{
  case "$1" in
{case(tree.subs)}
  esac
}}
{fn}_words() {{
  case "$1" in
{case(words)}
  esac
}}
{fn}_choices() {{
  case "$1" in
{case(choices)}
  esac
}}
{fn}() {{
  local cur="${{COMP_WORDS[COMP_CWORD]}}" prev="${{COMP_WORDS[COMP_CWORD-1]}}" path="" w i subs values
  for ((i = 1; i < COMP_CWORD; i++)); do
    w="${{COMP_WORDS[i]}}"
    subs=" $({fn}_subs "$path") "
    if [[ "$w" != -* && "$subs" == *" $w "* ]]; then path="${{path:+$path }}$w"; fi
  done
  values="$({fn}_choices "$path|$prev")"
  if [[ -z "$values" ]]; then values="$({fn}_words "$path")"; fi
  COMPREPLY=($(compgen -W "$values" -- "$cur"))
}}
complete -F {fn} {prog}
"""


def run_command(ns: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    print(bash_script(parser), end="")
    return 0
