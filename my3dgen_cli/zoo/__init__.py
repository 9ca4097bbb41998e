"""The model zoo: the registry of named artifacts, the verified content-addressed cache, downloads.

The library API (`from my3dgen_cli import zoo`), one module per job behind it:

    registry.py     entries: the packaged TOML files, lab registries, hashes recorded on first use
    download.py     moving bytes into a partial file: HTTP with resume and retries, local sources
    visible.py      what a download shows: the artifact's line, the progress bar
    store.py        the cache's layout, refs, per-name locks, cheap lookups (`cached`, `converted`)
    admit.py        checking bytes and moving them into the cache (trust on first use), or refusing them
    torch_hub.py    reusing a verified file from torch hub's cache
    obtain.py       `ensure`, `import_file`, `resolve_base`: a verified file by name; `fetch`: all of it for one name
    local_bases.py  `bases/NAME.safetensors`: generators the user has that are not registry artifacts
    inventory.py    `my3dgen cache`: listing, verifying, removing, pruning
"""

from my3dgen_cli.zoo.inventory import cache_list, inventory, prune_candidates, remove, remove_path, verify
from my3dgen_cli.zoo.local_bases import import_local_base, is_local_base, remove_local_base, verify_local_bases
from my3dgen_cli.zoo.obtain import ensure, fetch, import_file, resolve_base
from my3dgen_cli.zoo.registry import Entry, get_entry, list_entries
from my3dgen_cli.zoo.store import cached, converted, is_offline, read_ref
from my3dgen_cli.zoo.visible import Display

__all__ = [
    "Display", "Entry", "cache_list", "cached", "converted", "ensure", "fetch", "get_entry", "import_file",
    "import_local_base", "inventory", "is_local_base", "is_offline", "list_entries", "prune_candidates", "read_ref",
    "remove", "remove_local_base", "remove_path", "resolve_base", "verify", "verify_local_bases",
]  # fmt: skip
