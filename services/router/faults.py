"""Which worker failures a request survives: a replica died, restarted (its state is gone)
or a KV hand-off broke. The router re-prefills elsewhere (a target) or continues without
drafts (a drafter); any other error fails the request."""

from __future__ import annotations

import ray.exceptions

from dspark.kv.transport import PeerLost, TransferFailed
from services.workers.messages import StateLost

RECOVERABLE = (ray.exceptions.RayActorError, StateLost, PeerLost, TransferFailed, TimeoutError,
               ConnectionError)


def recoverable(e: BaseException) -> bool:
    if isinstance(e, RECOVERABLE):
        return True
    cause = getattr(e, "cause", None)
    return isinstance(e, ray.exceptions.RayTaskError) and isinstance(cause, RECOVERABLE)
