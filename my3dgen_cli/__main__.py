"""`python -m my3dgen_cli` runs the CLI (used by tests that need a real subprocess)."""

from my3dgen_cli.cli import main

main()
