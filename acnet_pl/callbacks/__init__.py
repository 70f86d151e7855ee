"""Lightning callbacks: `FuseCallback` writes the fused deploy files when training ends; `DiagnosticsCallback`
shows what ACB does in the dashboard (kernel maps, branch gammas, robustness, pruning)."""

from acnet_pl.callbacks.diagnostics import DiagnosticsCallback
from acnet_pl.callbacks.fuse import FuseCallback

__all__ = ["DiagnosticsCallback", "FuseCallback"]
