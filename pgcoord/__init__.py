"""pgcoord: cluster coordination for Python applications through PostgreSQL alone.

A cache, pub/sub, sync messages, an event queue and distributed locks for every instance of an
application, using only the PostgreSQL database it already has. Start with
:class:`Coordinator`.
"""

from __future__ import annotations

from pgcoord import cache as _cache
from pgcoord import errors as _errors
from pgcoord import locks as _locks
from pgcoord import pubsub as _pubsub
from pgcoord import queue as _queue
from pgcoord import sync_messages as _sync_messages
from pgcoord.blocking import BlockingCoordinator
from pgcoord.cache import *  # noqa: F403
from pgcoord.coordinator import DSN_ENV, Coordinator
from pgcoord.errors import *  # noqa: F403
from pgcoord.locks import *  # noqa: F403
from pgcoord.pubsub import *  # noqa: F403
from pgcoord.queue import *  # noqa: F403
from pgcoord.sync_messages import *  # noqa: F403

__version__ = "0.1.0"

__all__ = ["DSN_ENV", "BlockingCoordinator", "Coordinator", "__version__"]
__all__ += _errors.__all__
__all__ += _locks.__all__
# pgcoord.pubsub still re-exports SyncMessageManager and Plugin: list each name once.
__all__ += [name for name in _pubsub.__all__ if name not in _sync_messages.__all__]
__all__ += _sync_messages.__all__
__all__ += _queue.__all__
__all__ += _cache.__all__
