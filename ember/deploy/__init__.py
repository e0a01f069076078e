"""Running ember on serving platforms (`ember deploy ...`). Each platform's module imports its SDK lazily, so
that `ember --help` stays fast and works without it."""
