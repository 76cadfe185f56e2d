"""bridge-migrate: move a single-NIC host onto a bridge, verified, with exact rollback."""

import importlib.util
import sys

# The Debian package (debian/) installs the agent into the system's dist-packages and ships the
# pyroute2 it needs (0.9.7; Debian has 0.7 or 0.8) in a directory of its own: an agent installed
# there finds that one first. A virtual environment's agent (scripts/install) never looks.
_DEBIAN_DIST = "/usr/lib/python3/dist-packages/"
_DEBIAN_VENDOR = "/usr/share/bridge-migrate/vendor"
if __file__.startswith(_DEBIAN_DIST) and _DEBIAN_VENDOR not in sys.path:
    sys.path.insert(0, _DEBIAN_VENDOR)


def _pyroute2_without_its_init() -> None:
    """pyroute2's package __init__ imports every protocol the library knows (IPDB, NDB,
    conntrack, WireGuard, 9P, ...): a third of the agent's start. The agent imports the
    submodules it uses by their own paths, so the package is registered without running its
    __init__. Any other name asked of it (`from pyroute2 import NDB`) runs the whole __init__
    then: code that expects the full package still gets it."""
    if "pyroute2" in sys.modules:
        return
    spec = importlib.util.find_spec("pyroute2")
    if spec is None or spec.loader is None:
        return  # not installed: the agent's first import of it says so
    package = importlib.util.module_from_spec(spec)
    loader = spec.loader

    def whole(name: str) -> object:
        if importlib.util.find_spec(f"pyroute2.{name}") is not None:
            raise AttributeError(name)  # a submodule not imported yet: the import system loads it
        del package.__dict__["__getattr__"]
        loader.exec_module(package)
        return getattr(package, name)

    package.__dict__["__getattr__"] = whole
    sys.modules["pyroute2"] = package
    importlib.import_module("pyroute2.config.log")  # its logger's NullHandler, as __init__ does


_pyroute2_without_its_init()
