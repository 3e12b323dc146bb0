"""The import layers of .importlinter hold, and lint-imports would say so if one broke."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
LINT_IMPORTS = str(Path(sys.executable).with_name("lint-imports"))


def lint_imports(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([LINT_IMPORTS, "--no-cache", *args], cwd=REPO, capture_output=True, text=True, timeout=300)


def test_every_import_layer_is_kept():
    result = lint_imports()
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def test_a_forbidden_import_fails_the_check(tmp_path):
    # The web tier does import the protocol: a contract forbidding it must be reported broken, with the import.
    config = tmp_path / "forbid.ini"
    config.write_text("[importlinter]\nroot_packages =\n    inferstack\n    inferstack_web\n\n"
                      "[importlinter:contract:demo]\nname = demo\ntype = forbidden\n"
                      "source_modules =\n    inferstack_web\nforbidden_modules =\n    inferstack.protocol\n")
    result = lint_imports("--config", str(config))
    assert result.returncode == 1, result.stdout + result.stderr
    assert "inferstack_web.app -> inferstack.protocol" in result.stdout
