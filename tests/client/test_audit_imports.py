"""The privacy officer's audit runs without the ML stack: `fedrec audit` imports no torch."""

from __future__ import annotations

import subprocess
import sys


def test_the_audit_command_imports_no_torch() -> None:
    code = ("import sys, fedrec.client.audit.command; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'opacus', 'peft')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
