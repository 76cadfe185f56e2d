"""bridge-migrate: move a single-NIC host onto a bridge, verified, with exact rollback."""

import sys

# The Debian package (debian/) installs the agent into the system's dist-packages and ships the
# pyroute2 it needs (0.9.7; Debian has 0.7 or 0.8) in a directory of its own: an agent installed
# there finds that one first. A virtual environment's agent (scripts/install) never looks.
_DEBIAN_DIST = "/usr/lib/python3/dist-packages/"
_DEBIAN_VENDOR = "/usr/share/bridge-migrate/vendor"
if __file__.startswith(_DEBIAN_DIST) and _DEBIAN_VENDOR not in sys.path:
    sys.path.insert(0, _DEBIAN_VENDOR)
