"""Image datasets by name (IDX files, packaged datasets, generators), torch-free."""
