"""Lightning callbacks: `FuseCallback` writes the fused deploy files when training ends."""

from acnet_pl.callbacks.fuse import FuseCallback

__all__ = ["FuseCallback"]
