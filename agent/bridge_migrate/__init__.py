"""bridge-migrate: move a single-NIC host onto a bridge, verified, with exact rollback."""
