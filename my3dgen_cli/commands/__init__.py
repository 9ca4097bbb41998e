"""One module per command group; each registers itself on `my3dgen_cli.cli.app` when imported."""
