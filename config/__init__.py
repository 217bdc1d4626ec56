"""Shipped configuration. Installed as ``camserve.config`` so ``camserve kserve-bundle`` finds
its templates from an installed package too; servers read the files, not this package."""
