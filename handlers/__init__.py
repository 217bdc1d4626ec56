"""TorchServe handler files. Installed as ``camserve.handlers`` so ``camserve archive`` finds the
handler from an installed package too; TorchServe itself loads the file, not this package."""
