"""bridge-migrate-remote: run the agent on a host reached only by SSH, commit-confirmed over a
new SSH connection (see options.USAGE). Runs on a workstation: standard library and the agent's
contract only."""
