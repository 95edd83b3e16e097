# Sourced by quickstart.sh and test.sh: enter the repository, create and activate .venv (unless a virtual
# environment is already active) and install workbench into it.
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [ -z "${VIRTUAL_ENV:-}" ]; then
    [ -x .venv/bin/python ] || python3 -m venv .venv
    . .venv/bin/activate
fi
bash launch_scripts/install.sh
