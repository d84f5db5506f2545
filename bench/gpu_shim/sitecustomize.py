"""Import shim for a checkout that is not pip-installed (the GPU check's fallback).

The package maps `ssiu.kernels` to the top-level `kernels/` folder through setuptools'
package-dir, which only an install (editable or not) sets up. With this folder and the
repository root on PYTHONPATH, Python imports this module at start-up (site's
`sitecustomize` hook, in every child process too: pytest workers, compute-sanitizer's
target) and the finder below resolves `ssiu.kernels` to `<repo>/kernels`. Submodules
(`ssiu.kernels.msgm`, ...) then load through the package's own __path__.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


class _KernelsFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if fullname != "ssiu.kernels":
            return None
        init = REPO / "kernels" / "__init__.py"
        return importlib.util.spec_from_file_location(
            fullname, init, submodule_search_locations=[str(init.parent)]
        )


# First in line, so that a stale installed copy of the package cannot shadow this checkout.
if not any(isinstance(f, _KernelsFinder) for f in sys.meta_path):
    sys.meta_path.insert(0, _KernelsFinder())
