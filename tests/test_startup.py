"""What a command loads before it starts: `plan` and `status` only what they use (the cold start
is a bench row), and pyroute2 without its package __init__, whole again for whoever asks."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bridge_migrate_testlab import Lab


def _run(code: str) -> str:
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    return done.stdout


def _loaded_by(code: str) -> set[str]:
    out = _run(f"{code}\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))")
    return set(json.loads(out.splitlines()[-1]))


def test_the_cli_loads_neither_all_of_pyroute2_nor_what_changes_the_host() -> None:
    loaded = _loaded_by("import bridge_migrate.cli")
    assert "pyroute2.netlink.rtnl.ifinfmsg" in loaded, "the dumps' decoders"
    sockets = {"pyroute2.iproute.linux", "pyroute2.netlink.nlsocket", "asyncio"}
    assert not loaded & sockets, "`plan` reads by dumps: no IPRoute, no event loop"
    protocols = {"pyroute2.ipdb", "pyroute2.ndb.main", "pyroute2.conntrack", "pyroute2.wiset"}
    assert not loaded & protocols, "pyroute2's package __init__ ran"
    assert not loaded & {"yaml", "tenacity"}, "a netplan host's parser, the probes' retries"
    changes = {"bridge_migrate.transaction", "bridge_migrate.checkpoint", "bridge_migrate.verify"}
    assert not loaded & changes


def test_pyroute2_is_whole_for_whoever_asks_for_more() -> None:
    code = (
        "import logging, bridge_migrate\n"
        "from pyroute2.iproute.linux import IPRoute as linux\n"
        "from pyroute2 import NDB, IPRoute, config\n"
        "import pyroute2\n"
        "assert IPRoute is linux and NDB.__module__ == 'pyroute2.ndb.main'\n"
        "handlers = logging.getLogger('pyroute2').handlers\n"
        "assert any(isinstance(h, logging.NullHandler) for h in handlers), handlers\n"
        "print(pyroute2.__version__)\n"
    )
    assert _run(code).strip().startswith("0.9.")


def test_a_program_that_imported_pyroute2_first_keeps_its_own() -> None:
    loaded = _loaded_by("import pyroute2\nimport bridge_migrate.cli")
    assert "pyroute2.ndb.main" in loaded  # the package ran its __init__, as it was asked to


@pytest.mark.root
def test_a_plan_run_loads_no_netlink_socket_layer(lab: Lab, tmp_path: Path) -> None:
    """Not only the import: a whole `plan` of the lab host reads by dumps alone."""
    code = (
        "import json, sys\n"
        "from bridge_migrate.cli import main\n"
        f"code = main(['--state-dir', {str(tmp_path / 'state')!r}, 'plan', '--json'])\n"
        "wanted = ('asyncio', 'pyroute2.iproute.linux', 'tenacity')\n"
        "loaded = [m for m in wanted if m in sys.modules]\n"
        "print(json.dumps([code, loaded]), file=sys.stderr)\n"
    )
    done = lab.run(lab.host_ns, [sys.executable, "-c", code], timeout=60)
    code, loaded = json.loads(done.stderr.strip().splitlines()[-1])
    assert code == 0, done.stdout + done.stderr
    assert loaded == [], "a plan loaded what only a change needs"
