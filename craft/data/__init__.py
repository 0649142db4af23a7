"""Data shipped with the package (see the README beside each folder for provenance and licences)."""
