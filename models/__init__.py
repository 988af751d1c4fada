"""Model families, one file each; installed as ``pvae.models``."""
