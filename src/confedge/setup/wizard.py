"""The interactive wizard: asks the questions of questions.py in order, re-asks on a bad answer
with the reason, shows a summary, and applies the answers to the configuration document.

On a terminal it prompts with prompt_toolkit (line editing, Tab completion of the offered
choices, passwords not echoed); with no terminal (piped answers, a script, pexpect without a
pty) it reads plain lines, so the same questions can be answered from anything that writes text.
An answer left blank takes the default shown in brackets, which on a re-run is the file's value:
pressing Enter through the whole wizard changes nothing.
"""

from __future__ import annotations

import shutil
import sys
import textwrap
from collections.abc import Callable
from typing import Any, Protocol

from .document import SECRET_KEYS, ConfigDocument
from .questions import QUESTIONS, Question, State
from .values import AnswerError, fmt

__all__ = ["LinePrompter", "Prompter", "TerminalPrompter", "ask_all", "prompter", "summary"]


class Cancelled(Exception):
    """The operator ended the wizard (Ctrl-C, Ctrl-D, end of input): nothing is written."""


class Prompter(Protocol):
    def ask(self, message: str, choices: list[str], secret: bool) -> str: ...


class LinePrompter:
    """Plain lines on standard input/output: works with pipes and any terminal driver."""

    def __init__(self, read: Callable[[], str] | None = None, echo: bool = False) -> None:
        # Standard input is looked up when a question is asked, not when this module is
        # imported: with it closed (`confedge ... <&-`) sys.stdin is None, and every command
        # imports this module while building its parser.
        self._read = read
        self._echo = echo  # piped answers are not echoed by a terminal: print them (a log)

    def ask(self, message: str, choices: list[str], secret: bool) -> str:
        print(message, end="", flush=True)
        try:
            line = self._read() if self._read else _stdin_line()
        except KeyboardInterrupt:
            line = ""
        if not line:
            print()
            raise Cancelled
        answer = line.rstrip("\r\n")
        if self._echo:
            print("****" if secret and answer else answer)
        return answer


class TerminalPrompter:
    """prompt_toolkit on a real terminal: editing keys, history, Tab completes the choices."""

    def ask(self, message: str, choices: list[str], secret: bool) -> str:
        from prompt_toolkit import prompt
        from prompt_toolkit.completion import WordCompleter

        completer = WordCompleter(choices, sentence=True) if choices else None
        try:
            return prompt(message, completer=completer, is_password=secret)
        except (EOFError, KeyboardInterrupt):
            raise Cancelled from None


def _stdin_line() -> str:
    """One line of standard input; "" (end of input) when there is no standard input at all."""
    return sys.stdin.readline() if sys.stdin is not None else ""


def prompter() -> Prompter:
    if sys.stdin is None or sys.stdout is None:
        return LinePrompter(echo=False)  # closed: the first question ends the wizard
    if sys.stdin.isatty() and sys.stdout.isatty():
        return TerminalPrompter()
    return LinePrompter(echo=not sys.stdin.isatty())


def wrap(text: str, indent: str, rest: str | None = None) -> str:
    """`text` folded to the terminal's width (at most 100 columns), for help and advice.

    Only at spaces: the advice holds commands and paths to copy (`confedge firewall --config
    /etc/confedge-edge1/confedge.toml`), and a fold at a hyphen or inside a long path put a
    line break into what the operator pastes."""
    width = min(shutil.get_terminal_size((100, 24)).columns, 100)
    return textwrap.fill(
        text,
        width,
        initial_indent=indent,
        subsequent_indent=indent if rest is None else rest,
        break_on_hyphens=False,
        break_long_words=False,
    )


def _text(value: Any) -> str:
    """A value as the operator would type it back (lists comma-separated, booleans yes/no)."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list):
        return ", ".join(str(v) for v in value) if value else "none"
    return str(value)


def _default_label(q: Question, default: Any) -> str:
    if q.secret:
        return "keep current" if default else "blank = generate"
    return _text(default)


def _applicable(state: State) -> list[Question]:
    return [q for q in QUESTIONS if q.applies(state)]


def ask_all(state: State, ask: Prompter, out: Callable[[str], None] = print) -> None:
    """Ask every question that applies, in order, updating `state.values` with each answer."""
    i = 0
    while True:
        todo = _applicable(state)
        if i >= len(todo):
            return
        q = todo[i]
        default = q.default(state)
        out("")
        out(f"[{i + 1}/{len(todo)}] {q.title}")
        if q.help:
            out(wrap(q.help, "  "))
        choices = q.choices(state) if q.choices else []
        for n, (_, label) in enumerate(choices, 1):
            out(f"    {n}) {label}")
        label = _default_label(q, default)
        while True:
            text = ask.ask(
                f"  {q.prompt} [{label}]: " if label else f"  {q.prompt}: ",
                [c[0] for c in choices],
                q.secret,
            ).strip()
            raw: Any = text
            if text.isdigit() and choices and 1 <= int(text) <= len(choices):
                raw = choices[int(text) - 1][0]
            elif not text:
                if q.secret and not default:
                    raw = "generate"
                elif default in (None, "", []):
                    # An empty default is an answer too: its validator says whether it will do.
                    raw = "none" if isinstance(default, list) else ""
                else:
                    raw = default  # checked too: a hand-edited file may hold a bad value
            try:
                state.values[q.key] = q.validate(raw, state)
            except AnswerError as exc:
                out(f"  ! {exc.reason}")
                continue
            if q.key in state.generated:
                out("  generated a new one: it is shown on the summary, once")
            break
        i += 1


def summary(state: State, before: dict[str, Any], out: Callable[[str], None] = print) -> list[str]:
    """Print the summary screen; return the keys whose value changes ('*' on the screen)."""
    changed: list[str] = []
    out("")
    out("Summary (* = changed)")
    out("-" * 72)
    for q in _applicable(state):
        value = state.values[q.key]
        mark = "*" if value != before.get(q.key) else " "
        if mark == "*" and q.key != "interfaces":
            changed.append(q.key)
        if q.key in state.generated:
            shown = f"{_text(value)}   <- GENERATED, shown only now"
        elif q.secret or q.key in SECRET_KEYS:
            shown = "****" if value else "(none)"
        elif q.key == "interfaces":
            shown = "one (internal address for everything)" if value == 1 else "two"
        else:
            shown = fmt(value) if isinstance(value, list) else _text(value)
        out(f"{mark} {q.title:<34} {shown}")
    if state.values["interfaces"] == 1 and before.get("server.external_address"):
        out("* External address                   (removed: one interface)")
        changed.append("server.external_address")
    out("-" * 72)
    if state.generated:
        out(
            wrap(
                "WARNING: store the generated secret now (a password manager, the conferencing "
                "platform's TURN settings); this screen is the only time it is shown. It is "
                "kept in the configuration file (mode 0600).",
                "",
                "         ",
            )
        )
    return changed


def apply_answers(doc: ConfigDocument, state: State, keys: list[str]) -> None:
    """Write the changed answers into the document; keys not listed are left as they are."""
    for key in keys:
        if key == "server.external_address" and state.values["interfaces"] == 1:
            doc.set(key, None)
        else:
            doc.set(key, state.values[key])
