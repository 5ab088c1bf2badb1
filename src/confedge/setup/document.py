"""The configuration file as a document that keeps what the operator wrote.

Setup edits the file the way a careful person would with an editor: the keys it was told to
change get their new values, everything else (comments, key order, keys setup never asks about,
blank lines) stays byte for byte, which is why this is tomlkit and not `tomllib` + a writer.
Writing is atomic (a temporary file in the same directory, fsync, rename), mode 0600 because the
file holds TURN secrets, and the previous file is kept beside it as `<name>.bak`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import tomlkit
from tomlkit.items import Table
from tomlkit.toml_document import TOMLDocument

from confedge.config import Config, ConfigError, parse_config

__all__ = [
    "SECRET_KEYS",
    "ConfigDocument",
    "atomic_write",
]

# Keys never printed in full (summary screen, --dry-run): masked as "****".
SECRET_KEYS = ("turn.password", "turn.secrets")
_SECTIONS = Config.__struct_fields__


class ConfigDocument:
    """A TOML configuration being edited: read, set/unset dotted keys, validate, render."""

    def __init__(self, text: str = "", path: Path | None = None) -> None:
        self.path = path
        self.original = text
        try:
            self.doc: TOMLDocument = tomlkit.parse(text)
        except tomlkit.exceptions.ParseError as exc:
            where = str(path) if path else "configuration"
            raise ConfigError([f"{where}: not valid TOML: {exc}"]) from None

    @classmethod
    def load(cls, path: Path) -> ConfigDocument:
        """The file at `path`, or an empty document when there is none yet."""
        try:
            text = path.read_text(encoding="utf-8-sig")
        except FileNotFoundError:
            return cls("", path)
        except OSError as exc:
            raise ConfigError(
                [f"{path}: cannot read the configuration file: {exc.strerror or exc}"]
            ) from None
        except UnicodeDecodeError:
            raise ConfigError([f"{path}: the configuration file is not UTF-8 text"]) from None
        return cls(text, path)

    def get(self, key: str) -> Any:
        """The value the file gives `key` (plain Python), or None when it is not in the file."""
        section, name = key.split(".")
        table = self.doc.get(section)
        if table is None or name not in table:
            return None
        value = table[name]
        return value.unwrap() if hasattr(value, "unwrap") else value

    def set(self, key: str, value: Any) -> None:
        """Give `key` a value (None removes it, so its default applies); order and comments stay.

        A new section is added after the sections the file already has, in the model's order
        relative to each other where possible; a new key goes at the end of its section.
        """
        section, name = key.split(".")
        table = self.doc.get(section)
        if value is None:
            if table is not None and name in table:
                del table[name]
            return
        if table is None:
            table = tomlkit.table()
            self._add_section(section, table)
        if name in table and table[name] == value:
            return  # same value: keep the original item (its formatting, its inline comment)
        if isinstance(value, list):
            arr = tomlkit.array()
            arr.extend(value)
            table[name] = arr
        else:
            table[name] = value

    def _add_section(self, section: str, table: Table) -> None:
        later = _SECTIONS[_SECTIONS.index(section) + 1 :]
        existing = list(self.doc.keys())
        for i, name in enumerate(existing):
            if name in later:
                # tomlkit has no insert-before: rebuild the tail in order, keeping each item.
                tail = [(n, self.doc[n]) for n in existing[i:]]
                for n, _ in tail:
                    del self.doc[n]
                self.doc.add(section, table)
                for n, item in tail:
                    self.doc.add(n, item)
                return
        self.doc.add(section, table)

    def data(self) -> dict[str, Any]:
        """The document as plain data, as `tomllib` would read the rendered text."""
        return dict(self.doc.unwrap())

    def validate(self) -> Config:
        """The whole file through the configuration model (raises ConfigError, one line each)."""
        return parse_config(self.data())

    def render(self) -> str:
        return tomlkit.dumps(self.doc)

    def render_masked(self) -> str:
        """The rendered file with every secret replaced by "****" (for --dry-run output)."""
        masked = ConfigDocument(self.render())
        if masked.get("turn.password"):
            masked.set("turn.password", "****")
        secrets = masked.get("turn.secrets")
        if secrets:
            masked.set("turn.secrets", ["****" for _ in secrets])
        return masked.render()

    @property
    def changed(self) -> bool:
        return self.render() != self.original


def atomic_write(path: Path, text: str) -> Path | None:
    """Write `text` to `path` atomically, mode 0600; return the `.bak` of the old file, if any.

    The temporary file lives in the same directory (rename is only atomic within a file
    system), is fsynced before the rename and the directory after it, so a crash leaves either
    the old file or the new one, never half of either. A symbolic link (a configuration kept in
    a repository and linked into /etc/confedge) is followed: its target is replaced, not the
    link, which would leave the real file as it was.
    """
    if path.is_symlink():
        path = path.resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    backup: Path | None = None
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            os.fchmod(f.fileno(), 0o600)
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        if path.exists():
            backup = path.with_name(path.name + ".bak")
            shutil.copy2(path, backup)
            os.chmod(backup, 0o600)  # the old file holds the same kind of secrets
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return backup
