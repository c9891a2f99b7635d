"""Model folders: sources, download, completeness check, embedded conversion, memory estimate, per-family data."""
