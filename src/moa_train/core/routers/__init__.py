"""Gate computation only: networks (linear / SwiGLU), activations, sparse selection, aux losses."""

from moa_train.core.routers.router import Router, RouterOutput

__all__ = ["Router", "RouterOutput"]
