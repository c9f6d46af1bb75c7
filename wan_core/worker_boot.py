"""The first code a spawned worker process runs (wan_core.workers.WorkerPool starts it with runpy.run_path, so
nothing of the core has to be importable by name yet): import the core package under the same import path as in the
parent process, from the parent's folders, then hand over to wan_core.workers.run_worker.

The packages around the core (the pack's own package inside ComfyUI) are registered as bare packages with their
search path, so their __init__ (ComfyUI's node registration) does not run in a worker; the core package itself is
loaded from its folder, so another top-level package named `wan_core` on sys.path cannot stand in for it.
Globals set by the parent (wan_core.workers.boot_globals): CORE, PACKAGES, and run_worker's arguments.
"""
import importlib
import importlib.util
import os
import sys
import types


def import_core(core, packages):
    """Import `core` (a dotted path) given [(package name, search path)] of it and its outer packages, outermost first."""
    for name, path in packages:
        if name in sys.modules:
            continue
        if name == core:
            spec = importlib.util.spec_from_file_location(name, os.path.join(path[0], "__init__.py"),
                                                          submodule_search_locations=path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            spec.loader.exec_module(module)
        else:
            module = types.ModuleType(name)
            module.__path__ = list(path)
            sys.modules[name] = module
    return importlib.import_module(core + ".workers")


if __name__ == "__wan_worker__":
    import_core(CORE, PACKAGES).run_worker(**globals())  # noqa: F821  (CORE, PACKAGES: set by the parent)
