"""The model zoo: the registry of named artifacts, the verified content-addressed cache, downloads."""
