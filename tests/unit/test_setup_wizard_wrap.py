"""The setup wizard's advice folds only at spaces: commands and paths stay whole to copy."""

from __future__ import annotations

from confedge.setup.wizard import wrap


def test_a_path_with_hyphens_is_not_broken_across_lines() -> None:
    path = "/etc/confedge-edge-number-one/with-a-long-long-directory-name/confedge.toml"
    text = wrap(f"3. Service: `confedge install-service --config {path}`, then more words", "  ")
    assert any(path in line for line in text.splitlines()), text
    for line in text.splitlines():
        assert not line.rstrip().endswith("-"), text
