"""Makes the reference packages importable without their optional dependencies,
for the tools that run them (make_golden.py, bench_reference.py).

galore_torch.adamw imports transformers only for a version check, and both
packages' __init__ import bitsandbytes, which the projector and AdamW code do
not need. Import this module before importing from them.
"""
import importlib.util
import sys
import types

_versions = types.ModuleType("transformers.utils.versions")
_versions.require_version = lambda *a, **k: None
for _name, _mod in [("transformers", types.ModuleType("transformers")),
                    ("transformers.utils", types.ModuleType("transformers.utils")),
                    ("transformers.utils.versions", _versions)]:
    sys.modules.setdefault(_name, _mod)


def bare_package(name):
    """Registers package `name` without running its __init__."""
    spec = importlib.util.find_spec(name)
    if spec is None:
        sys.exit(f"{name} not found: see the calling script's docstring")
    pkg = types.ModuleType(name)
    pkg.__path__ = list(spec.submodule_search_locations)
    sys.modules[name] = pkg
