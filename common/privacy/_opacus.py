"""Opacus' accountants (RDP, PRV) without torch: its own files, loaded under a private name.

`import opacus.accountants` runs opacus/__init__.py and opacus/accountants/accountant.py, which
import torch (the optimizers, the grad samplers) although the accounting itself is numpy and
scipy. So that ε maths, noise calibration and the audit run without torch — on the very code the
clients' accountant runs — this module loads Opacus' accountant files (accountants/rdp.py,
accountants/prv.py and accountants/analysis/) as a private package. Their one torch-side import,
the abstract base `IAccountant` (whose part used here is `self.history = []`), is replaced by
`_HistoryBase`. tests/common/test_privacy.py checks the results against Opacus' own accountants.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from pathlib import Path
from typing import Any

_PACKAGE = f"{__name__}_files"  # fedrec.common.privacy._opacus_files.accountants.{rdp,prv}


class _HistoryBase:
    """What RDPAccountant and PRVAccountant take from Opacus' IAccountant: a history list."""

    def __init__(self) -> None:
        self.history: list[tuple[float, float, int]] = []


def _package(name: str, path: Path) -> None:
    module = types.ModuleType(name)
    module.__path__ = [str(path)]
    module.__package__ = name
    sys.modules[name] = module


def _load() -> tuple[Any, Any]:
    if f"{_PACKAGE}.accountants.prv" not in sys.modules:
        spec = importlib.util.find_spec("opacus")  # locates the package without importing it
        if spec is None or not spec.submodule_search_locations:
            raise ImportError("opacus is not installed: it is fedrec's accountant (pip install opacus)")
        root = Path(next(iter(spec.submodule_search_locations)))
        _package(_PACKAGE, root)
        _package(f"{_PACKAGE}.accountants", root / "accountants")
        base = types.ModuleType(f"{_PACKAGE}.accountants.accountant")
        vars(base)["IAccountant"] = _HistoryBase
        sys.modules[base.__name__] = base
    rdp = importlib.import_module(f"{_PACKAGE}.accountants.rdp")
    prv = importlib.import_module(f"{_PACKAGE}.accountants.prv")
    return rdp.RDPAccountant, prv.PRVAccountant


RDPAccountant, PRVAccountant = _load()
